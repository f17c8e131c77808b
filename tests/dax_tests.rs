//! The ndctl-style DAX suite (`daxfs dax-tests`) as cargo tests: each runs
//! one of its tests through the library, through a temporary FUSE mount
//! the suite makes (and always unmounts), and through that mount with the
//! preload library (built beside the `daxfs` command: `cargo build -p
//! daxfs-preload`, as `cargo xtask test` does), and checks the table's rows.

use std::process::Command;

/// A row of the table: the test's name and its three columns.
#[derive(Debug)]
struct Row {
    name: String,
    library: String,
    mount: String,
    preload: String,
}

/// Run `daxfs dax-tests --only WORD` and return its table rows for the
/// tests whose names start with `prefix`.
fn suite(word: &str, prefix: &str) -> Vec<Row> {
    suite_with(word, prefix, &[])
}

/// `suite`, with more arguments for `daxfs dax-tests`.
fn suite_with(word: &str, prefix: &str, more: &[&str]) -> Vec<Row> {
    let out = Command::new(env!("CARGO_BIN_EXE_daxfs"))
        .args(["dax-tests", "--only", word])
        .args(more)
        .output()
        .expect("run daxfs dax-tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "daxfs dax-tests --only {word} failed:\n{stdout}{stderr}"
    );
    let rows: Vec<Row> = stdout
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            // "mmap -Mrwps      pass     pass     pass     (1)": the name may
            // hold a space.
            let cells: Vec<&str> = l.split_whitespace().collect();
            let at = cells
                .iter()
                .position(|c| matches!(*c, "pass" | "FAIL" | "skip"))
                .unwrap_or_else(|| panic!("no result in the row {l:?}"));
            let cell = |i: usize| cells.get(at + i).unwrap_or(&"").to_string();
            Row {
                name: cells[..at].join(" "),
                library: cell(0),
                mount: cell(1),
                preload: cell(2),
            }
        })
        .collect();
    assert!(!rows.is_empty(), "no row for {prefix}:\n{stdout}");
    rows
}

fn passes_every_way(word: &str) {
    for row in suite(word, word) {
        assert_eq!(
            (
                row.library.as_str(),
                row.mount.as_str(),
                row.preload.as_str()
            ),
            ("pass", "pass", "pass"),
            "{row:?}"
        );
    }
}

#[test]
fn dax_pmd_direct_io_and_mremap() {
    passes_every_way("dax-pmd");
}

#[test]
fn dax_errors_one_sigbus_eio_and_a_covering_write_clears() {
    passes_every_way("dax-errors");
}

/// pmem-errors.sh's file case: one bad sector refuses its whole page to
/// direct and buffered reads (EIO), until a write covering the sector.
#[test]
fn pmem_errors_one_bad_sector_refuses_its_page_until_a_covering_write() {
    passes_every_way("pmem-errors");
}

#[test]
fn dax_poison_in_a_populated_sync_mapping_then_punch_and_write() {
    passes_every_way("dax-poison");
}

/// `daxfs inject-error` into a live mount answers only once the kernel's
/// cached pages of the range are gone, so the very next mapped access
/// raises SIGBUS. On a disk-backed image (every persist also msyncs, so the
/// daemon's invalidation thread lags most) this failed about one run in
/// four while the answer came before the invalidation.
#[test]
fn dax_poison_on_a_disk_backed_mount_sees_the_poison_as_soon_as_injected() {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-disk")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let dir = dir.path().to_str().unwrap();
    for round in 0..2 {
        for row in suite_with("dax-poison", "dax-poison", &["--dir", dir]) {
            assert_eq!(row.mount, "pass", "round {round}: {row:?}");
            assert_eq!(row.preload, "pass", "round {round}: {row:?}");
        }
    }
}

#[test]
fn truncate_of_a_mapped_file_by_another_process() {
    passes_every_way("truncate-mapped");
}

#[test]
fn mmap_all_18_flag_sets() {
    let rows = suite("mmap", "mmap");
    assert_eq!(rows.len(), 18, "{rows:?}");
    let names: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names.len(), 18, "each flag set once: {names:?}");
    for row in rows {
        assert_eq!(
            (
                row.library.as_str(),
                row.mount.as_str(),
                row.preload.as_str()
            ),
            ("pass", "pass", "pass"),
            "{row:?}"
        );
    }
}

#[test]
fn break_layouts_through_the_library() {
    let rows = suite("break-layouts", "break-layouts");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].library, "pass");
    assert_eq!(
        rows[0].mount, "skip",
        "library only, and the table says why"
    );
    assert_eq!(rows[0].preload, "skip");
}

#[test]
fn an_unknown_test_is_an_error_naming_the_tests() {
    let out = Command::new(env!("CARGO_BIN_EXE_daxfs"))
        .args(["dax-tests", "--only", "no-such-test", "--library-only"])
        .output()
        .expect("run daxfs dax-tests");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no test matches") && stderr.contains("dax-pmd"),
        "{stderr}"
    );
}
