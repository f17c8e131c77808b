//! `cargo xtask`: the project's own chores.
//!
//! * `cargo xtask test` — formatting check, clippy with warnings denied, the
//!   loom model check of the entry-lock wait protocol, then every test of the
//!   workspace; ends with one `N passed, M failed` line.
//! * `cargo xtask bench [ROUNDS]` — the `memcpy_persist` benchmark (against
//!   PMDK when libpmem is installed), run ROUNDS times (default 3), reported as
//!   ratios of medians so that a noisy machine still gives a fair comparison.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask test [-- CARGO TEST ARGS]\n       cargo xtask bench [ROUNDS]"
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

const SIZES: [&str; 3] = ["4KiB", "64KiB", "2MiB"];

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
    let mut samples: Vec<Vec<(String, String, f64)>> = Vec::new();
    for round in 1..=rounds {
        let mut cmd = cargo();
        cmd.args(["bench", "--bench", "memcpy_persist"]);
        if pmdk {
            cmd.args(["--features", "pmdk"]);
        }
        cmd.stdout(Stdio::null());
        run(
            cmd,
            &format!("memcpy_persist benchmark, round {round} of {rounds}"),
        )?;
        samples.push(read_medians(pmdk)?);
    }
    println!(
        "memcpy_persist, ratio of median times (below 1.00: daxfs is faster), {rounds} rounds"
    );
    println!(
        "{:<8} {:>22} {:>18}",
        "size", "daxfs / copy+persist", "daxfs / PMDK"
    );
    for size in SIZES {
        let ratio = |other: &str| -> Option<f64> {
            let mut per_round: Vec<f64> = samples
                .iter()
                .filter_map(|round| {
                    let find = |name: &str| {
                        round
                            .iter()
                            .find(|(n, s, _)| n == name && s == size)
                            .map(|r| r.2)
                    };
                    Some(find("daxfs")? / find(other)?)
                })
                .collect();
            per_round.sort_by(f64::total_cmp);
            per_round.get(per_round.len() / 2).copied()
        };
        let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
        println!(
            "{size:<8} {:>22} {:>18}",
            show(ratio("copy_then_persist")),
            show(ratio("pmdk"))
        );
    }
    Ok(())
}

fn has_libpmem() -> bool {
    Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("libpmem.so "))
        .unwrap_or(false)
}

/// Median times (ns) criterion saved for this run: (function, size, ns).
fn read_medians(pmdk: bool) -> Result<Vec<(String, String, f64)>, String> {
    let base = root().join("target/criterion/memcpy_persist");
    let mut functions = vec!["daxfs", "copy_then_persist"];
    if pmdk {
        functions.push("pmdk");
    }
    let mut found = Vec::new();
    for function in functions {
        for size in SIZES {
            let path = base.join(function).join(size).join("new/estimates.json");
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let ns = json["median"]["point_estimate"]
                .as_f64()
                .ok_or_else(|| format!("{}: no median", path.display()))?;
            found.push((function.to_string(), size.to_string(), ns));
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
