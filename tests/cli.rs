//! The `daxfs` command, run as a user runs it.

use pmem::{Device, DeviceOptions};
use std::path::Path;
use std::process::{Command, Output};

fn daxfs(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_daxfs"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run daxfs")
}

/// Run daxfs and insist that it succeeds.
fn daxfs_ok(dir: &Path, args: &[&str]) -> Output {
    let out = daxfs(dir, args);
    assert!(out.status.success(), "daxfs {args:?}: {}", stderr(&out));
    out
}

/// `daxfs list IMAGE --media-errors`, parsed.
fn media_errors(dir: &Path, image: &str) -> serde_json::Value {
    serde_json::from_slice(&daxfs_ok(dir, &["list", image, "--media-errors"]).stdout).unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A failure: exit status 1 and one line on stderr naming `what`, no panic.
fn assert_clean_failure(out: &Output, what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("daxfs: ") && err.contains(what), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("daxfs-cli")
        .tempdir_in("/dev/shm")
        .unwrap()
}

/// `create` with no arguments makes the image `daxfs mount` mounts when
/// given none (in memory; here in `DAXFS_IMAGES`), and describes it;
/// `info` with no arguments finds it. In a directory holding a
/// `pmem0.img` made by an earlier version, that one is the default.
#[test]
fn create_with_no_arguments_makes_the_default_image_and_describes_it() {
    let dir = shm_dir();
    let images = dir.path().join("images");
    let run = |cwd: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_daxfs"))
            .args(args)
            .current_dir(cwd)
            .env("DAXFS_IMAGES", &images)
            .output()
            .unwrap()
    };
    let image = images.join("pmem0.img");
    let out = run(dir.path(), &["create"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("created {}", image.display())),
        "{text}"
    );
    assert!(
        text.contains("1 GiB") && text.contains("persistence:  memory"),
        "{text}"
    );
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 30);
    assert!(!dir.path().join("pmem0.img").exists());
    let info = stdout(&run(dir.path(), &["info"]));
    assert!(info.starts_with(&image.display().to_string()), "{info}");
    // A second create refuses to overwrite it.
    assert_clean_failure(&run(dir.path(), &["create"]), "already exists");
    // An image of an earlier version in the current directory.
    let earlier = dir.path().join("earlier");
    std::fs::create_dir(&earlier).unwrap();
    assert!(run(&earlier, &["create", "pmem0.img", "--size", "16M"])
        .status
        .success());
    let info = stdout(&run(&earlier, &["info"]));
    assert!(
        info.starts_with("pmem0.img") && info.contains("16 MiB"),
        "{info}"
    );
}

#[test]
fn bad_sizes_are_refused_with_the_rule() {
    let dir = shm_dir();
    for size in ["0", "1M", "17M", "lots", "16777214T", "65T"] {
        let out = daxfs(dir.path(), &["create", "x.img", "--size", size]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("2 MiB") && err.contains("64 TiB") || err.contains("not a size"),
            "{size}: {err}"
        );
        assert!(!err.contains("panicked"));
        assert!(!dir.path().join("x.img").exists());
    }
}

#[test]
fn inject_list_and_clear_round_trip_in_ndctl_json() {
    let dir = shm_dir();
    let d = dir.path();
    daxfs_ok(d, &["create", "d.img", "--size", "16M"]);
    daxfs_ok(
        d,
        &["inject-error", "d.img", "--block", "8", "--count", "2"],
    );
    daxfs_ok(d, &["inject-error", "d.img", "--offset", "1M"]);
    let json = media_errors(d, "d.img");
    assert_eq!(json["badblock_count"], 3);
    assert_eq!(json["badblocks"][0]["offset"], 8);
    assert_eq!(json["badblocks"][0]["length"], 2);
    assert_eq!(json["badblocks"][1]["offset"], 2048);
    assert_eq!(json["size"], 16 << 20);

    daxfs_ok(
        d,
        &["clear-errors", "d.img", "--offset", "4096", "--count", "1"],
    );
    let json = media_errors(d, "d.img");
    assert_eq!(json["badblock_count"], 2);
    assert_eq!(json["badblocks"][0]["offset"], 9);

    daxfs_ok(d, &["clear-errors", "d.img", "--all"]);
    assert_eq!(media_errors(d, "d.img")["badblock_count"], 0);
    // Without --media-errors, no badblocks are listed.
    let json: serde_json::Value =
        serde_json::from_slice(&daxfs_ok(d, &["list", "d.img"]).stdout).unwrap();
    assert!(json.get("badblocks").is_none());
}

#[test]
fn clearing_part_of_a_sector_is_refused_and_names_the_device() {
    let dir = shm_dir();
    daxfs_ok(dir.path(), &["create", "d.img", "--size", "16M"]);
    let out = daxfs(
        dir.path(),
        &["clear-errors", "d.img", "--offset", "100", "--count", "1"],
    );
    assert_clean_failure(&out, "d.img: range 0x64+0x200 must be aligned to 512 bytes");
}

#[test]
fn scrub_reports_what_was_injected() {
    let dir = shm_dir();
    let d = dir.path();
    daxfs_ok(d, &["create", "d.img", "--size", "16M"]);
    daxfs_ok(
        d,
        &["inject-error", "d.img", "--block", "100", "--count", "3"],
    );
    let text = stdout(&daxfs_ok(d, &["scrub", "d.img"]));
    assert!(text.contains("3 sectors in 1 poisoned range"), "{text}");
    assert!(text.contains("sectors 100..102"), "{text}");
}

#[test]
fn a_device_held_by_another_process_names_its_pid() {
    let dir = shm_dir();
    let path = dir.path().join("held.img");
    let _held = Device::create(&path, 16 << 20, &DeviceOptions::new()).unwrap();
    let out = daxfs(dir.path(), &["info", "held.img"]);
    assert_clean_failure(&out, &format!("in use by process {}", std::process::id()));
}

#[test]
fn bad_files_give_one_line_errors() {
    let dir = shm_dir();
    std::fs::write(dir.path().join("text.txt"), "hello").unwrap();
    assert_clean_failure(
        &daxfs(dir.path(), &["info", "text.txt"]),
        "text.txt: not a pmem device",
    );
    assert_clean_failure(
        &daxfs(dir.path(), &["info", "missing.img"]),
        "missing.img: cannot open",
    );
    assert_clean_failure(&daxfs(dir.path(), &["scrub", "missing.img"]), "missing.img");
}

#[test]
fn every_subcommand_explains_itself() {
    let dir = shm_dir();
    for (sub, words) in [
        ("create", "multiple of 2 MiB"),
        ("info", "persistence"),
        ("inject-error", "SIGBUS"),
        ("list", "badblocks"),
        ("clear-errors", "zeros"),
        ("scrub", "scrub"),
        ("mkfs", "--force"),
        ("fsck", "fsck(8)"),
    ] {
        let out = daxfs(dir.path(), &[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help failed");
        assert!(
            stdout(&out).contains(words),
            "{sub} --help lacks {words:?}: {}",
            stdout(&out)
        );
    }
    let out = daxfs(dir.path(), &["--help"]);
    for sub in [
        "create",
        "info",
        "inject-error",
        "list",
        "clear-errors",
        "scrub",
    ] {
        assert!(stdout(&out).contains(sub));
    }
}

#[test]
fn info_json_is_machine_readable() {
    let dir = shm_dir();
    daxfs_ok(dir.path(), &["create", "d.img", "--size", "32M"]);
    let out = daxfs_ok(dir.path(), &["info", "d.img", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["size"], 32 << 20);
    assert_eq!(json["persistence"], "memory");
    assert_eq!(json["filesystem"], "tmpfs");
}

#[test]
fn mkfs_creates_and_refuses_to_overwrite_without_force() {
    let dir = shm_dir();
    let d = dir.path();
    assert_clean_failure(&daxfs(d, &["mkfs", "fs.img"]), "give --size");
    let out = stdout(&daxfs_ok(d, &["mkfs", "fs.img", "--size", "64M"]));
    assert!(out.contains("daxfs filesystem of 64 MiB"), "{out}");
    assert_clean_failure(&daxfs(d, &["mkfs", "fs.img"]), "use --force");
    daxfs_ok(d, &["mkfs", "fs.img", "--force"]);
    let info = stdout(&daxfs_ok(d, &["info", "fs.img"]));
    assert!(info.contains("filesystem:   daxfs"), "{info}");
}

#[test]
fn fsck_exit_codes_follow_fsck8() {
    let dir = shm_dir();
    let d = dir.path();
    daxfs_ok(d, &["mkfs", "fs.img", "--size", "32M"]);
    let out = daxfs(d, &["fsck", "fs.img"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("clean"));
    // Damage the backup superblock: an error, corrected by --repair.
    let path = d.join("fs.img");
    let mut bytes = std::fs::read(&path).unwrap();
    let backup = bytes.len() - 4096;
    bytes[backup + 20] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();
    let out = daxfs(d, &["fsck", "fs.img"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stdout(&out).contains("ERROR: backup superblock"),
        "{}",
        stdout(&out)
    );
    let out = daxfs(d, &["fsck", "fs.img", "--repair"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(daxfs(d, &["fsck", "fs.img"]).status.code(), Some(0));
    // Not a filesystem at all: an operational error.
    daxfs_ok(d, &["create", "raw.img", "--size", "16M"]);
    assert_eq!(daxfs(d, &["fsck", "raw.img"]).status.code(), Some(8));
    assert_eq!(daxfs(d, &["fsck", "missing.img"]).status.code(), Some(8));
}

/// `mkfs --from DIR` makes a filesystem holding a copy of the tree, as
/// `mke2fs -d` does, and it checks clean.
#[test]
fn mkfs_from_a_directory_copies_the_tree() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{symlink, PermissionsExt};
    let dir = shm_dir();
    let d = dir.path();
    let tree = d.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(tree.join("lost+found")).unwrap();
    std::fs::write(tree.join("lost+found/kept"), b"k").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(tree.join("sub/big"), &big).unwrap();
    std::fs::write(tree.join("sub/deeper/small"), b"small").unwrap();
    std::fs::hard_link(tree.join("sub/deeper/small"), tree.join("hard")).unwrap();
    symlink("sub/big", tree.join("link")).unwrap();
    std::fs::set_permissions(tree.join("sub/big"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // Special files, one with a second link.
    let special = |name: &str, mode: u32, dev: u64| {
        let c = std::ffi::CString::new(tree.join(name).as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string; mknod only reads it.
        assert_eq!(unsafe { libc::mknod(c.as_ptr(), mode, dev) }, 0, "{name}");
    };
    special("fifo", libc::S_IFIFO | 0o620, 0);
    special("sub/tty", libc::S_IFCHR | 0o600, libc::makedev(4, 7));
    special("disk", libc::S_IFBLK | 0o640, libc::makedev(259, 3));
    std::fs::hard_link(tree.join("fifo"), tree.join("sub/fifo-link")).unwrap();
    let out = daxfs_ok(
        d,
        &[
            "mkfs",
            "fs.img",
            "--size",
            "64M",
            "--from",
            tree.to_str().unwrap(),
        ],
    );
    assert!(
        stdout(&out).contains("copied 3 files")
            && stdout(&out).contains("3 special files")
            && stdout(&out).contains("2 hard links"),
        "{}",
        stdout(&out)
    );
    assert_eq!(daxfs(d, &["fsck", "fs.img"]).status.code(), Some(0));
    // info shows where the bitmap's checksums are (a 64 MiB device: one
    // bitmap block, eight 512-byte pieces).
    let info: serde_json::Value =
        serde_json::from_slice(&daxfs_ok(d, &["info", "fs.img", "--json"]).stdout).unwrap();
    assert_eq!(info["layout"]["bitmap_checksums"]["pieces"], 8);
    let fs =
        daxfs::Fs::mount(Device::open(d.join("fs.img"), &DeviceOptions::new()).unwrap()).unwrap();
    assert!(fs.read_path("/sub/big").unwrap() == big);
    assert_eq!(fs.stat_path("/sub/big").unwrap().mode & 0o7777, 0o600);
    assert_eq!(fs.read_path("/hard").unwrap(), b"small");
    assert_eq!(fs.stat_path("/hard").unwrap().nlink, 2);
    assert_eq!(
        fs.stat_path("/hard").unwrap().ino,
        fs.stat_path("/sub/deeper/small").unwrap().ino
    );
    assert_eq!(
        fs.readlink(fs.resolve("/link").unwrap()).unwrap(),
        b"sub/big"
    );
    assert_eq!(fs.read_path("/lost+found/kept").unwrap(), b"k");
    // (Modes as the umask left them in the source tree.)
    let kind = |path: &str| {
        use std::os::unix::fs::MetadataExt;
        let a = fs.stat_path(path).unwrap();
        let source = std::fs::symlink_metadata(tree.join(&path[1..])).unwrap();
        assert_eq!(a.mode, source.mode(), "{path}");
        (a.kind, a.rdev, a.nlink)
    };
    use daxfs::FileKind::*;
    assert_eq!(kind("/fifo"), (Fifo, 0, 2));
    assert_eq!(kind("/sub/fifo-link"), (Fifo, 0, 2));
    assert_eq!(kind("/sub/tty"), (CharDevice, libc::makedev(4, 7), 1));
    assert_eq!(kind("/disk"), (BlockDevice, libc::makedev(259, 3), 1));
    // Not a directory: a one-line error.
    let out = daxfs(d, &["mkfs", "g.img", "--size", "16M", "--from", "fs.img"]);
    assert_clean_failure(&out, "not a directory");
}

/// A mount point that is a file is refused before anything is mounted
/// or made (it used to mount, and every access gave EIO).
#[test]
fn a_mount_point_that_is_a_file_is_refused() {
    let dir = shm_dir();
    let d = dir.path();
    std::fs::write(d.join("file"), b"not a directory").unwrap();
    let out = daxfs(d, &["mount", "fs.img", "file"]);
    assert_clean_failure(&out, "not a directory");
    assert!(!d.join("fs.img").exists(), "no image made");
    assert_eq!(std::fs::read(d.join("file")).unwrap(), b"not a directory");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(d.to_str().unwrap()), "nothing mounted");
}
