//! `cargo xtask`: the project's own chores.
//!
//! * `cargo xtask test` — formatting check, clippy with warnings denied, the
//!   loom model check of the entry-lock wait protocol, then every test of the
//!   workspace; ends with one `N passed, M failed` line.
//! * `cargo xtask bench [ROUNDS]` — the criterion benchmarks (`memcpy_persist`
//!   against PMDK when libpmem is installed; the entry index against
//!   `BTreeMap` baselines; filesystem operations against tmpfs; namespace
//!   lookups, creates and the shrinker with one and two threads), run ROUNDS
//!   times (default 3), reported as ratios of medians so that a noisy machine
//!   still gives a fair comparison; then `compare`.
//! * `cargo xtask dax-tests [--mount DIR] [ARGS]` — the ndctl-style DAX
//!   suite (`daxfs dax-tests`, release build): dax-pmd, dax-errors,
//!   dax-poison, the 18 mmap flag sets and break layouts, through the
//!   library and through a FUSE mount; a pass/fail table.
//! * `cargo xtask preload-bench` — the preload library end to end against
//!   the library and the plain mount (see `benches/preload.rs`); also part
//!   of `bench`.
//! * `cargo xtask fsck-bench` — `daxfs fsck` against `e2fsck -fn` on
//!   16 GiB images holding the same 100,000 files (see `fsck_bench.rs`).
//! * `cargo xtask compare` — fio and a metadata test on a daxfs FUSE mount,
//!   tmpfs and fuse2fs in one run (needs `apt-get install fio fuse2fs`): a
//!   table of throughputs and ratios and a bar chart in `target/bench/`.

mod compare;
mod fsck_bench;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("compare") => compare(),
        Some("fsck-bench") => fsck_bench::fsck_bench(&root()),
        Some("preload-bench") => preload_bench(),
        Some("dax-tests") => dax_tests(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask test [-- CARGO TEST ARGS]\n       cargo xtask bench [ROUNDS]\n       cargo xtask compare\n       cargo xtask preload-bench\n       cargo xtask fsck-bench\n       cargo xtask dax-tests [--mount DIR] [ARGS] (see daxfs dax-tests --help)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The end-to-end comparison alone (also the last part of `bench`).
fn compare() -> Result<(), String> {
    let mut build = cargo();
    build.args(["build", "--release", "--bin", "daxfs"]);
    run(build, "cargo build --release --bin daxfs")?;
    compare::compare(&root(), &root().join("target/release/daxfs"))
}

/// The release `daxfs` command and, beside it, the release preload library.
fn build_release_with_preload() -> Result<(), String> {
    let mut build = cargo();
    build.args(["build", "--release", "--bin", "daxfs"]);
    run(build, "cargo build --release --bin daxfs")?;
    let mut build = cargo();
    build.args(["build", "--release", "-p", "daxfs-preload"]);
    run(build, "cargo build --release -p daxfs-preload")
}

/// The preload library end to end (benches/preload.rs), which needs the
/// release library beside the release `daxfs` command.
fn preload_bench() -> Result<(), String> {
    build_release_with_preload()?;
    let mut bench = cargo();
    bench.args(["bench", "--bench", "preload"]);
    run(bench, "the preload benchmark")
}

/// The ndctl-style DAX suite of the release `daxfs` command (and of the
/// release preload library, for its third column).
fn dax_tests(args: &[String]) -> Result<(), String> {
    build_release_with_preload()?;
    let mut suite = Command::new(root().join("target/release/daxfs"));
    suite.arg("dax-tests").args(args);
    run(suite, "daxfs dax-tests")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    eprintln!("xtask: {what}");
    let status = cmd.status().map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn test(extra: &[String]) -> Result<(), String> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt, "cargo fmt --check")?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy, "cargo clippy -D warnings")?;
    // The entry locks' wait protocol, model-checked by loom in its own build.
    let mut loom = cargo();
    loom.args(["test", "-q", "-p", "daxfs", "--lib", "--release", "loom"])
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", root().join("target/loom"));
    run(loom, "loom model check of the entry-lock wait protocol")?;

    // The preload library is a cdylib, which `cargo test` does not build;
    // tests/preload.rs runs programs with it.
    let mut preload = cargo();
    preload.args(["build", "-q", "-p", "daxfs-preload"]);
    run(preload, "cargo build -p daxfs-preload")?;

    eprintln!("xtask: cargo test --workspace");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"])
        .args(extra)
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cargo test: {e}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("stdout was piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading cargo test output: {e}"))?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait().map_err(|e| format!("cargo test: {e}"))?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        return Err(format!("cargo test failed ({status})"));
    }
    if passed == 0 {
        return Err("no test ran".to_string());
    }
    Ok(())
}

/// The number just before `label` in a cargo test summary ("ok. 10 passed; 0 failed").
fn count_before(text: &str, label: &str) -> u64 {
    text.find(label)
        .and_then(|end| text[..end].rsplit([' ', '.']).next()?.parse().ok())
        .unwrap_or(0)
}

/// One round's median times in nanoseconds, by "group/function/parameter".
type Medians = HashMap<String, f64>;

fn bench(args: &[String]) -> Result<(), String> {
    let rounds: usize = match args.first() {
        Some(n) => n
            .parse()
            .map_err(|_| format!("ROUNDS must be a number, not {n:?}"))?,
        None => 3,
    };
    let pmdk = has_libpmem();
    if !pmdk {
        eprintln!("xtask: libpmem not found (apt-get install libpmem-dev): comparing without PMDK");
    }
    let mut samples: Vec<Medians> = Vec::new();
    for round in 1..=rounds {
        for bench in [
            "memcpy_persist",
            "entry_index",
            "fs_ops",
            "namespace",
            "dax",
            "failure",
            "journal",
        ] {
            let mut cmd = cargo();
            cmd.args(["bench", "--bench", bench]);
            if pmdk && matches!(bench, "memcpy_persist" | "dax") {
                cmd.args(["--features", "pmdk"]);
            }
            cmd.stdout(Stdio::null());
            run(
                cmd,
                &format!("{bench} benchmark, round {round} of {rounds}"),
            )?;
        }
        samples.push(read_medians()?);
    }
    // The median over rounds of a figure computed within each round.
    let median = |figure: &dyn Fn(&Medians) -> Option<f64>| -> Option<f64> {
        let mut values: Vec<f64> = samples.iter().filter_map(figure).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    let ratio = |a: String, b: String| move |m: &Medians| Some(m.get(&a)? / m.get(&b)?);
    let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));

    println!("\nmemcpy_persist: ratio of median times, below 1.00 means daxfs is faster ({rounds} rounds)");
    println!(
        "{:<8} {:>22} {:>16}",
        "size", "daxfs / copy+persist", "daxfs / PMDK"
    );
    for size in ["4KiB", "64KiB", "2MiB"] {
        let ours = format!("memcpy_persist/daxfs/{size}");
        println!(
            "{size:<8} {:>22} {:>16}",
            show(median(&ratio(
                ours.clone(),
                format!("memcpy_persist/copy_then_persist/{size}")
            ))),
            show(median(&ratio(ours, format!("memcpy_persist/pmdk/{size}")))),
        );
    }

    println!("\nentry index: median time of the index, and how many times slower the baseline is ({rounds} rounds)");
    println!(
        "{:<30} {:>12} {:>18} {:>18}",
        "operation", "index", "Mutex<BTreeMap>", "RwLock<BTreeMap>"
    );
    for (label, group, function) in [
        ("load (hit)", "entry_index", "load_hit"),
        ("load (miss)", "entry_index", "load_miss"),
        ("lock_entry + unlock", "entry_index", "lock_unlock"),
        ("store + erase", "entry_index", "store_erase"),
        (
            "tagged scan, 1 Mi, 1% tagged",
            "entry_index",
            "tagged_scan_1pct",
        ),
        (
            "load, 2 readers + 1 writer",
            "entry_index_contended",
            "load_2_readers_1_writer",
        ),
    ] {
        let ours = format!("{group}/{function}/index");
        let ns = median(&|m: &Medians| m.get(&ours).copied());
        let time = ns.map_or("-".to_string(), |ns| {
            if ns >= 10_000.0 {
                format!("{:.1} us", ns / 1000.0)
            } else {
                format!("{ns:.1} ns")
            }
        });
        let against = |baseline: &str| {
            show(median(&ratio(
                format!("{group}/{function}/{baseline}"),
                ours.clone(),
            )))
        };
        println!(
            "{label:<30} {time:>12} {:>18} {:>18}",
            against("mutex_btreemap"),
            against("rwlock_btreemap")
        );
    }

    println!("\nfilesystem operations: daxfs library on /dev/shm against std::fs on tmpfs ({rounds} rounds)");
    println!(
        "{:<30} {:>12} {:>12} {:>22}",
        "operation", "daxfs", "tmpfs", "tmpfs / daxfs (>1 wins)"
    );
    let time = |ns: Option<f64>| {
        ns.map_or("-".to_string(), |ns| {
            if ns >= 10_000.0 {
                format!("{:.1} us", ns / 1000.0)
            } else {
                format!("{ns:.0} ns")
            }
        })
    };
    for (label, function) in [
        ("create + close", "create_close"),
        ("stat", "stat"),
        ("unlink", "unlink"),
        ("4 KiB append (durable)", "append_4k"),
        ("4 KiB overwrite (durable)", "overwrite_4k"),
        ("2 MiB write (durable)", "write_2m"),
        ("readdir of 10,000", "readdir_10000"),
    ] {
        let ours = format!("fs_ops/{function}/daxfs");
        let theirs = format!("fs_ops/{function}/tmpfs");
        println!(
            "{label:<30} {:>12} {:>12} {:>22}",
            time(median(&|m: &Medians| m.get(&ours).copied())),
            time(median(&|m: &Medians| m.get(&theirs).copied())),
            show(median(&ratio(theirs.clone(), ours.clone()))),
        );
    }

    println!("\nnamespace: time per operation and scaling to 2 threads ({rounds} rounds; 2.00 is perfect)");
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "operation", "1 thread", "2 threads", "scaling"
    );
    let scaling =
        |one: String, two: String| move |m: &Medians| Some(2.0 * m.get(&one)? / m.get(&two)?);
    for (label, function) in [
        ("lookup of a cached depth-4 path", "lookup_depth4"),
        ("tmpfs stat of a depth-4 path", "tmpfs_stat_depth4"),
        ("create + unlink, one directory", "create_unlink"),
        ("tmpfs create + unlink, one dir", "tmpfs_create_unlink"),
    ] {
        let one = format!("namespace/{function}/1");
        let two = format!("namespace/{function}/2");
        println!(
            "{label:<34} {:>12} {:>12} {:>10}",
            time(median(&|m: &Medians| m.get(&one).copied())),
            time(median(&|m: &Medians| m.get(&two).copied())),
            show(median(&scaling(one.clone(), two.clone()))),
        );
    }
    let pass = "namespace/shrink_pass/100000_inodes".to_string();
    println!(
        "{:<34} {:>12}",
        "shrinker pass, 100,000 inodes",
        time(median(&|m: &Medians| m.get(&pass).copied()))
    );

    println!("\nDAX mappings of a 1 GiB file ({rounds} rounds)");
    let dax = |f: &str| format!("dax/{f}");
    let per_4k = |name: &str| {
        let key = dax(&format!("map_touch_1g/{name}"));
        median(&move |m: &Medians| Some(m.get(&key)? / 262_144.0))
    };
    println!(
        "{:<46} {:>10} {:>10} {:>8}",
        "map and touch, per 4 KiB", "PMD", "PTE", "PTE/PMD"
    );
    println!(
        "{:<46} {:>10} {:>10} {:>8}",
        "",
        time(per_4k("pmd")),
        time(per_4k("pte")),
        show(median(&ratio(
            dax("map_touch_1g/pte"),
            dax("map_touch_1g/pmd")
        ))),
    );
    println!("{:<46} {:>10}", "ratio of throughputs (target >= 0.9)", "");
    for (label, ours, theirs) in [
        (
            "loads: mapping / anonymous memcpy",
            "load_1g/mapping",
            "load_1g/anonymous",
        ),
        (
            "stores+persist: mapping / device memcpy_persist",
            "store_persist_1g/mapping",
            "store_persist_1g/device",
        ),
        (
            "stores+persist: mapping / PMDK pmem_memcpy_persist",
            "store_persist_1g/mapping",
            "store_persist_1g/pmdk",
        ),
    ] {
        println!(
            "{label:<46} {:>10}",
            show(median(&ratio(dax(theirs), dax(ours))))
        );
    }

    println!("\nbreak layouts and memory failure ({rounds} rounds)");
    let failure = |f: &str| {
        let key = format!("failure/{f}");
        median(&move |m: &Medians| m.get(&key).copied())
    };
    for (label, f) in [
        ("pin + unpin, 4 KiB", "pin_unpin/4KiB"),
        (
            "pin + unpin, 4 KiB of a mapped file",
            "pin_unpin/4KiB_mapped_file",
        ),
        ("memory failure, 1 mapping", "memory_failure/1_mappings"),
        (
            "memory failure, 100 mappings",
            "memory_failure/100_mappings",
        ),
    ] {
        println!("{label:<46} {:>10}", time(failure(f)));
    }
    println!(
        "{:<46} {:>10}",
        "memory failure, 100 / 1 mappings",
        show(median(&ratio(
            "failure/memory_failure/100_mappings".into(),
            "failure/memory_failure/1_mappings".into()
        )))
    );

    println!("\njournal: mount time ({rounds} rounds)");
    let journal = |f: &str| {
        let key = format!("journal/mount/{f}");
        median(&move |m: &Medians| m.get(&key).copied())
    };
    println!(
        "{:<46} {:>10}",
        "after a clean unmount (empty ring)",
        time(journal("clean"))
    );
    println!(
        "{:<46} {:>10}",
        "after a crash (32,800 changes since mount)",
        time(journal("after_crash"))
    );
    println!(
        "{:<46} {:>10}",
        "after a crash / after a clean unmount",
        show(median(&ratio(
            "journal/mount/after_crash".into(),
            "journal/mount/clean".into()
        )))
    );

    println!("\naging (WineFS-style; layout, not time: one run)");
    let mut cmd = cargo();
    cmd.args(["bench", "--bench", "aging"]);
    run(cmd, "aging benchmark")?;
    preload_bench()?;
    compare()
}

fn has_libpmem() -> bool {
    Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("libpmem.so "))
        .unwrap_or(false)
}

/// The median times criterion saved for its latest run of every benchmark
/// (`target/criterion/GROUP/FUNCTION/PARAMETER/new/estimates.json`).
fn read_medians() -> Result<Medians, String> {
    let base = root().join("target/criterion");
    let mut found = Medians::new();
    let dirs = |path: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "report"))
                    .collect()
            })
            .unwrap_or_default()
    };
    for group in dirs(&base) {
        for function in dirs(&group) {
            for parameter in dirs(&function) {
                let path = parameter.join("new/estimates.json");
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                let ns = json["median"]["point_estimate"]
                    .as_f64()
                    .ok_or_else(|| format!("{}: no median", path.display()))?;
                let name = |p: &Path| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                };
                found.insert(
                    format!("{}/{}/{}", name(&group), name(&function), name(&parameter)),
                    ns,
                );
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn summary_counts_are_read() {
        let rest = "ok. 10 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(count_before(rest, " passed"), 10);
        assert_eq!(count_before(rest, " failed"), 2);
        assert_eq!(count_before("FAILED. 3 passed; 1 failed;", " passed"), 3);
    }
}
