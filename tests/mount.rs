//! daxfs mounted with FUSE, used through real system calls. Every mount is
//! in a temporary directory and is unmounted when its guard drops, also
//! when a test fails (lazily, and the daemon killed, if a clean unmount is
//! refused).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::{daxfs, is_mounted, text, Mounted};

/// `program`, to be run as `nobody` (uid and gid 65534, no supplementary
/// groups). Through setpriv, not `CommandExt::uid`: a command that changes
/// its credentials is started with a full fork, whose copy of this (many
/// threaded) test process's file table holds other tests' open files, and
/// so their mounts busy, until it execs, a long while on a loaded machine;
/// a plain spawn is a vfork, over in an instant.
fn as_nobody(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
    cmd
}

/// The first line a child started with piped standard output writes.
fn first_line(child: &mut std::process::Child) -> String {
    let mut line = String::new();
    let out = child.stdout.as_mut().expect("stdout piped");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
    line
}

fn fsck_clean(img: &Path) {
    let out = daxfs(&["fsck".as_ref(), img.as_os_str()]);
    assert!(out.status.success(), "fsck: {}", text(&out));
}

#[test]
fn posix_calls_through_the_kernel_and_the_files_survive_unmount() {
    let mut m = Mounted::new("");
    // Files and directories.
    fs::create_dir(m.path("docs")).unwrap();
    fs::write(m.path("docs/a.txt"), b"hello, pmem").unwrap();
    assert_eq!(fs::read(m.path("docs/a.txt")).unwrap(), b"hello, pmem");
    let mut names: Vec<String> = fs::read_dir(m.path("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt"]);
    assert_eq!(
        fs::remove_dir(m.path("docs")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    // Hard links and symlinks.
    fs::hard_link(m.path("docs/a.txt"), m.path("b.txt")).unwrap();
    assert_eq!(fs::metadata(m.path("b.txt")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("docs/a.txt", m.path("link")).unwrap();
    assert_eq!(
        fs::read_link(m.path("link")).unwrap(),
        Path::new("docs/a.txt")
    );
    assert_eq!(fs::read(m.path("link")).unwrap(), b"hello, pmem");
    // Renames, with RENAME_NOREPLACE through renameat2.
    fs::rename(m.path("b.txt"), m.path("docs/c.txt")).unwrap();
    assert!(!m.path("b.txt").exists());
    fs::write(m.path("other"), b"x").unwrap();
    let (from, to) = (
        CString::new(m.path("other").as_os_str().as_bytes()).unwrap(),
        CString::new(m.path("docs/c.txt").as_os_str().as_bytes()).unwrap(),
    );
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    // O_APPEND and O_TRUNC.
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.path("other"))
        .unwrap();
    f.write_all(b"yz").unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("other")).unwrap(), b"xyz");
    drop(
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path("other"))
            .unwrap(),
    );
    assert_eq!(fs::metadata(m.path("other")).unwrap().len(), 0);
    // A sparse file with data beyond 4 GiB.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(m.path("sparse"))
        .unwrap();
    let far = 5u64 << 30;
    f.write_all_at(b"far away", far).unwrap();
    let meta = f.metadata().unwrap();
    assert_eq!(meta.len(), far + 8);
    // At most the one 2 MiB extent a file this large gets around its data.
    assert!(
        meta.blocks() * 512 <= 2 << 20,
        "sparse: {} blocks",
        meta.blocks()
    );
    let mut buf = [1u8; 8];
    f.read_exact_at(&mut buf, far).unwrap();
    assert_eq!(&buf, b"far away");
    f.read_exact_at(&mut buf, 1 << 30).unwrap();
    assert_eq!(buf, [0; 8], "holes read as zeros");
    drop(f);
    // Permissions and timestamps.
    fs::set_permissions(m.path("other"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.path("other")).unwrap().mode() & 0o7777,
        0o600
    );
    let then = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(m.path("other"))
        .unwrap()
        .set_modified(then)
        .unwrap();
    assert_eq!(
        fs::metadata(m.path("other")).unwrap().modified().unwrap(),
        then
    );
    // A larger file, written and read through the 1 MiB requests.
    let big: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(m.path("big"), &big).unwrap();
    let mut back = Vec::new();
    File::open(m.path("big"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == big, "5 MiB round trip");
    // Unlink while open: still readable through the open file.
    let mut open = File::open(m.path("docs/a.txt")).unwrap();
    fs::remove_file(m.path("docs/a.txt")).unwrap();
    fs::remove_file(m.path("link")).unwrap();
    let mut s = String::new();
    open.seek(SeekFrom::Start(0)).unwrap();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello, pmem");
    drop(open);

    let out = m.umount();
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(!is_mounted(&m.mnt));
    fsck_clean(&m.img);
    m.mount("");
    assert_eq!(fs::read(m.path("docs/c.txt")).unwrap(), b"hello, pmem");
    assert_eq!(fs::metadata(m.path("sparse")).unwrap().len(), far + 8);
    assert_eq!(fs::read(m.path("big")).unwrap().len(), big.len());
}

#[test]
fn mmap_of_a_file_agrees_with_read_and_write() {
    let m = Mounted::new("");
    let path = m.path("mapped");
    fs::write(&path, vec![0u8; 8192]).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // SAFETY: a fresh shared mapping of an open file; only this test uses it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: the mapping is 8192 bytes long and lives until munmap below.
    let bytes = unsafe { std::slice::from_raw_parts_mut(map as *mut u8, 8192) };
    f.write_all_at(b"written", 100).unwrap();
    assert_eq!(
        &bytes[100..107],
        b"written",
        "write() is seen by the mapping"
    );
    bytes[5000..5006].copy_from_slice(b"stored");
    // SAFETY: the mapping above.
    assert_eq!(unsafe { libc::msync(map, 8192, libc::MS_SYNC) }, 0);
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 5000).unwrap();
    assert_eq!(&buf, b"stored", "stores are seen by read()");
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(map, 8192) };
}

#[test]
fn a_second_mount_is_refused_naming_where_and_a_busy_unmount_says_so() {
    let mut m = Mounted::new("");
    let other = m._dir.path().join("other");
    let out = daxfs(&["mount".as_ref(), m.img.as_os_str(), other.as_os_str()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already mounted at") && err.contains(&*m.mnt.to_string_lossy()),
        "{err}"
    );
    let open = File::create(m.path("held")).unwrap();
    let out = m.umount();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{}",
        text(&out)
    );
    drop(open);
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    fsck_clean(&m.img);
}

#[test]
fn sigterm_to_a_foreground_daemon_unmounts_cleanly() {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-mount")
        .tempdir_in("/dev/shm")
        .unwrap();
    let (img, mnt) = (dir.path().join("img"), dir.path().join("mnt"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_daxfs"))
        .args([
            "mount".as_ref(),
            img.as_os_str(),
            mnt.as_os_str(),
            "--foreground".as_ref(),
        ])
        .spawn()
        .unwrap();
    // Whatever happens, the mount goes and the daemon dies.
    struct Guard<'a>(&'a Path, &'a mut std::process::Child);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if is_mounted(self.0) {
                let c = CString::new(self.0.as_os_str().as_bytes()).unwrap();
                // SAFETY: a valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = self.1.kill();
            let _ = self.1.wait();
        }
    }
    let pid = child.id() as i32;
    let guard = Guard(&mnt, &mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mnt) {
        assert!(
            Instant::now() < deadline,
            "the foreground mount never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    fs::write(mnt.join("kept"), b"across a signal").unwrap();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = guard.1.wait().unwrap();
    assert!(status.success(), "the daemon exits cleanly: {status}");
    assert!(!is_mounted(&mnt));
    drop(guard);
    fsck_clean(&img);
    let out = daxfs(&["info".as_ref(), img.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn permissions_are_checked_for_another_user() {
    let m = Mounted::new("allow_other");
    fs::create_dir(m.path("private")).unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir(m.path("shared")).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(m.path("readable"), b"anyone may read").unwrap();
    fs::set_permissions(m.path("readable"), fs::Permissions::from_mode(0o644)).unwrap();
    // A child that becomes `nobody` and reports what it may do.
    let sh_as_nobody = |script: &str| -> Output {
        as_nobody("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&m.mnt)
            .output()
            .unwrap()
    };
    let out = sh_as_nobody("cat readable");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(out.stdout, b"anyone may read");
    let out = sh_as_nobody("echo x >> readable");
    assert!(
        !out.status.success(),
        "nobody may not write a 0644 file of root's"
    );
    let out = sh_as_nobody("ls private");
    assert!(!out.status.success(), "nor list a 0700 directory");
    let out = sh_as_nobody("echo mine > shared/f && cat shared/f");
    assert!(out.status.success(), "{}", text(&out));
    let meta = fs::metadata(m.path("shared/f")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (65534, 65534),
        "owned by its creator"
    );
    // The control channel is the owner's (root's) alone.
    let out = as_nobody(env!("CARGO_BIN_EXE_daxfs"))
        .arg("stat")
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        text(&out)
    );
    let out = daxfs(&["stat".as_ref(), m.mnt.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out));
    // Without allow_other, another user may not even look (the kernel
    // keeps them out: the daemon does not filter by uid).
    let mine = Mounted::new("");
    fs::write(mine.path("f"), b"x").unwrap();
    fs::set_permissions(mine.path("f"), fs::Permissions::from_mode(0o644)).unwrap();
    for script in ["ls mnt", "cat mnt/f", "stat mnt/f"] {
        let out = as_nobody("sh")
            .arg("-c")
            .arg(script)
            .current_dir(mine.mnt.parent().unwrap())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{script}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied"), "{script}: {err}");
    }
    let out = Command::new("cat").arg(mine.path("f")).output().unwrap();
    assert_eq!(out.stdout, b"x", "the owner may");
}

/// A foreground daemon, started by a test; the guard unmounts (lazily if
/// it must) and kills it whatever happens.
struct Foreground {
    _dir: tempfile::TempDir,
    img: PathBuf,
    mnt: PathBuf,
    child: std::process::Child,
}

impl Foreground {
    fn start() -> Foreground {
        let dir = tempfile::Builder::new()
            .prefix("daxfs-mount")
            .tempdir_in("/dev/shm")
            .unwrap();
        let (img, mnt) = (dir.path().join("img"), dir.path().join("mnt"));
        Foreground::run(dir, img, mnt)
    }

    /// A foreground daemon of the image `img` at `mnt` (both kept).
    fn start_on(img: &Path, mnt: &Path) -> Foreground {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        Foreground::run(dir, img.to_path_buf(), mnt.to_path_buf())
    }

    fn run(dir: tempfile::TempDir, img: PathBuf, mnt: PathBuf) -> Foreground {
        let child = Command::new(env!("CARGO_BIN_EXE_daxfs"))
            .args([
                "mount".as_ref(),
                img.as_os_str(),
                mnt.as_os_str(),
                "--foreground".as_ref(),
                "-o".as_ref(),
                "threads=4".as_ref(),
            ])
            .spawn()
            .unwrap();
        let f = Foreground {
            _dir: dir,
            img,
            mnt,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&f.mnt) {
            assert!(
                Instant::now() < deadline,
                "the foreground mount never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }

    /// Kill the daemon with SIGKILL (its mount is left to the kernel, dead).
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Unmount and return the daemon's exit status (0: the filesystem
    /// unmounted with no inode left referenced).
    fn stop(&mut self) -> std::process::ExitStatus {
        let out = daxfs(&["umount".as_ref(), self.mnt.as_os_str()]);
        assert!(out.status.success(), "umount: {}", text(&out));
        self.child.wait().unwrap()
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let c = CString::new(self.mnt.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid C string.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                // SAFETY: as above.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lustre's racer, in small: processes doing random namespace and data
/// operations on a few names for a while. Errors that the races explain
/// are expected; anything else (EIO, ESTALE, a hang) is not.
#[test]
fn racer_processes_leave_a_clean_filesystem_and_no_leaked_inode() {
    let secs: u64 = std::env::var("DAXFS_RACER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut f = Foreground::start();
    for d in 0..3 {
        fs::create_dir(f.mnt.join(format!("d{d}"))).unwrap();
    }
    let workers: Vec<std::process::Child> = (0..4)
        .map(|i| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "racer_worker", "--ignored", "--nocapture"])
                .env("DAXFS_RACER_DIR", &f.mnt)
                .env("DAXFS_RACER_SEED", format!("{}", i * 7919 + 1))
                .env("DAXFS_RACER_SECS", secs.to_string())
                // Its own "test result" line is not a result of this suite.
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // The workers stop themselves; a hang is caught here.
    let deadline = Instant::now() + Duration::from_secs(secs + 120);
    for mut w in workers {
        loop {
            if let Some(status) = w.try_wait().unwrap() {
                assert!(status.success(), "a racer worker failed: {status}");
                break;
            }
            if Instant::now() > deadline {
                let _ = w.kill();
                panic!("a racer worker hung");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let status = f.stop();
    assert!(
        status.success(),
        "the daemon unmounted with nothing left referenced: {status}"
    );
    fsck_clean(&f.img);
}

/// One racer process (run by the test above, through this test binary).
#[test]
#[ignore = "a worker of the racer test, not a test by itself"]
fn racer_worker() {
    let Ok(dir) = std::env::var("DAXFS_RACER_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut rng = Xs(std::env::var("DAXFS_RACER_SEED").unwrap().parse().unwrap());
    let secs: u64 = std::env::var("DAXFS_RACER_SECS").unwrap().parse().unwrap();
    let mut rand = move |n: u64| rng.below(n);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut ops = 0u64;
    while Instant::now() < end {
        let mut path = || dir.join(format!("d{}/n{}", rand(3), rand(20)));
        let (a, b) = (path(), path());
        let r: std::io::Result<()> = match rand(12) {
            0 => File::create(&a).map(drop),
            1 => OpenOptions::new()
                .create(true)
                .append(true)
                .open(&a)
                .and_then(|mut f| f.write_all(b"racer was here\n")),
            2 => fs::rename(&a, &b),
            3 => fs::hard_link(&a, &b),
            4 => fs::remove_file(&a),
            5 => fs::create_dir(&a),
            6 => fs::remove_dir(&a),
            7 => fs::read_dir(a.parent().unwrap()).map(|d| d.for_each(drop)),
            8 => fs::symlink_metadata(&a).map(drop),
            9 => OpenOptions::new()
                .write(true)
                .open(&a)
                .and_then(|f| f.set_len(rand(1 << 20))),
            10 => OpenOptions::new()
                .write(true)
                .open(&a)
                .and_then(|f| f.write_all_at(&[7u8; 5000], rand(1 << 22))),
            _ => fs::read(&a).map(drop),
        };
        if let Err(e) = r {
            let expected = [
                libc::ENOENT,
                libc::EEXIST,
                libc::ENOTEMPTY,
                libc::EISDIR,
                libc::ENOTDIR,
                libc::EINVAL,
                libc::EPERM,
                libc::EMLINK,
            ];
            assert!(
                e.raw_os_error().is_some_and(|n| expected.contains(&n)),
                "{}: unexpected error {e}",
                a.display()
            );
        }
        ops += 1;
    }
    assert!(ops > 100, "only {ops} operations");
}

#[test]
fn sigkill_of_the_daemon_loses_nothing_that_was_fsynced() {
    let mut f = Foreground::start();
    let files = f.mnt.join("files");
    fs::create_dir(&files).unwrap();
    // A writer that fsyncs file after file and reports each one done.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<u32>();
    let writer = {
        let files = files.clone();
        std::thread::spawn(move || {
            for i in 0.. {
                let body = vec![(i % 251) as u8; 1000 + i as usize * 37 % 9000];
                let r = File::create(files.join(format!("f{i}")))
                    .and_then(|mut file| file.write_all(&body).and_then(|()| file.sync_all()));
                if r.is_err() || done_tx.send(i).is_err() {
                    return;
                }
            }
        })
    };
    let first = done_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    f.kill();
    writer.join().unwrap();
    let synced: Vec<u32> = std::iter::once(first).chain(done_rx.try_iter()).collect();
    assert!(synced.len() > 3, "the writer got going: {synced:?}");
    // The dead mount is left to the kernel; a new mount over it works.
    assert!(is_mounted(&f.mnt));
    fsck_clean(&f.img);
    let mut m = Mounted::over(&f.img, &f.mnt, "");
    for i in synced {
        let body = fs::read(m.path(&format!("files/f{i}"))).unwrap();
        assert_eq!(
            body,
            vec![(i % 251) as u8; 1000 + i as usize * 37 % 9000],
            "f{i} was fsynced before the kill"
        );
    }
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    fsck_clean(&m.img);
}

// ---- the daemon killed under load -----------------------------------------

/// FNV-1a, to compare contents through a log.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// xorshift: the churn's choices.
struct Xs(u64);

impl Xs {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// What a churn worker's log says its directory holds: files (length, hash,
/// xattrs) and directories, by path inside it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Churned {
    files: std::collections::BTreeMap<String, (u64, u64, std::collections::BTreeMap<String, u64>)>,
    dirs: std::collections::BTreeSet<String>,
}

/// Read a worker's log: every operation that finished, applied; and the
/// paths the operation in flight at the kill (begun, never ended) may have
/// left either way.
fn read_churn_log(log: &Path) -> (Churned, Vec<String>) {
    let mut state = Churned::default();
    let mut in_flight: Vec<String> = Vec::new();
    for line in fs::read_to_string(log).unwrap_or_default().lines() {
        let w: Vec<&str> = line.split(' ').collect();
        match w[0] {
            "B" => in_flight = w[2..].iter().map(|s| s.to_string()).collect(),
            "E" => {
                in_flight.clear();
                match w[1] {
                    "W" => {
                        let xattrs = state.files.remove(w[2]).map(|f| f.2).unwrap_or_default();
                        state.files.insert(
                            w[2].into(),
                            (w[3].parse().unwrap(), w[4].parse().unwrap(), xattrs),
                        );
                    }
                    "X" => {
                        let f = state.files.get_mut(w[2]).unwrap();
                        f.2.insert(w[3].into(), w[4].parse().unwrap());
                    }
                    "R" => {
                        let f = state.files.remove(w[2]).unwrap();
                        state.files.insert(w[3].into(), f);
                    }
                    "U" => {
                        state.files.remove(w[2]);
                    }
                    "M" => {
                        state.dirs.insert(w[2].into());
                    }
                    "D" => {
                        state.dirs.remove(w[2]);
                    }
                    op => panic!("bad log line {line:?} ({op})"),
                }
            }
            _ => panic!("bad log line {line:?}"),
        }
    }
    (state, in_flight)
}

/// The value hash of every `user.*` xattr of `path`.
fn xattr_hashes(path: &Path) -> std::collections::BTreeMap<String, u64> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: a valid C string and a buffer of the size given.
    let n = unsafe { libc::listxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}", path.display());
    names.truncate(n as usize);
    let mut out = std::collections::BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: valid C strings and a buffer of the size given.
        let n = unsafe {
            libc::getxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(n >= 0, "getxattr {}", path.display());
        value.truncate(n as usize);
        let key = String::from_utf8_lossy(name)
            .trim_start_matches("user.")
            .to_string();
        out.insert(key, fnv(&value));
    }
    out
}

/// What a worker's directory holds on the mount, in the log's terms.
fn churned_on_mount(dir: &Path) -> Churned {
    let mut seen = Churned::default();
    let mut stack = vec![String::new()];
    while let Some(sub) = stack.pop() {
        for e in fs::read_dir(dir.join(&sub)).unwrap() {
            let e = e.unwrap();
            let rel = if sub.is_empty() {
                e.file_name().to_string_lossy().into_owned()
            } else {
                format!("{sub}/{}", e.file_name().to_string_lossy())
            };
            if e.file_type().unwrap().is_dir() {
                seen.dirs.insert(rel.clone());
                stack.push(rel);
            } else {
                let data = fs::read(e.path()).unwrap();
                let xattrs = xattr_hashes(&e.path());
                seen.files
                    .insert(rel, (data.len() as u64, fnv(&data), xattrs));
            }
        }
    }
    seen
}

/// Check a worker's directory against its log: every finished operation
/// is there exactly, nothing else is, except what the operation in flight
/// at the kill touched.
fn check_churned(dir: &Path, log: &Path) {
    let (want, in_flight) = read_churn_log(log);
    let seen = churned_on_mount(dir);
    let loose = |p: &str| {
        in_flight
            .iter()
            .any(|f| f == p || p.starts_with(&format!("{f}/")))
    };
    for (p, f) in &want.files {
        if !loose(p) {
            assert_eq!(
                seen.files.get(p),
                Some(f),
                "{}: {p} (log {})",
                dir.display(),
                log.display()
            );
        }
    }
    for p in seen.files.keys() {
        assert!(
            want.files.contains_key(p) || loose(p),
            "{}: {p} is there but the log never finished making it",
            dir.display()
        );
    }
    for d in want.dirs.symmetric_difference(&seen.dirs) {
        assert!(
            loose(d),
            "{}: directory {d} differs from the log",
            dir.display()
        );
    }
}

/// Several processes churn a mount (create, write and fsync with a log of
/// what each finished, xattrs, renames, unlinks, mkdir and rmdir); the
/// daemon is killed with SIGKILL at a random moment; the next mount
/// recovers: fsck clean, every logged file and name exactly as logged.
/// Twenty rounds on one image, so later rounds reuse blocks freed earlier
/// (whole earlier rounds are removed as it goes). `DAXFS_KILL_ROUNDS`
/// sets the number of rounds.
#[test]
fn sigkill_of_the_daemon_under_churn_recovers_everything_finished() {
    let rounds: u64 = std::env::var("DAXFS_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::Builder::new()
        .prefix("daxfs-kill")
        .tempdir_in("/dev/shm")
        .unwrap();
    let (img, mnt, logs) = (
        dir.path().join("img"),
        dir.path().join("mnt"),
        dir.path().join("logs"),
    );
    fs::create_dir(&logs).unwrap();
    let out = daxfs(&[
        "mkfs".as_ref(),
        img.as_os_str(),
        "--size".as_ref(),
        "256M".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut kept: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut pace = Xs(0x9e37_79b9);
    for round in 0..rounds {
        let mut f = Foreground::start_on(&img, &mnt);
        let workers: Vec<(std::process::Child, PathBuf, PathBuf)> = (0..4)
            .map(|w| {
                let (work, log) = (
                    mnt.join(format!("r{round}w{w}")),
                    logs.join(format!("r{round}w{w}")),
                );
                fs::create_dir(&work).unwrap();
                let child = Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "churn_worker", "--ignored", "--nocapture"])
                    .env("DAXFS_CHURN_DIR", &work)
                    .env("DAXFS_CHURN_LOG", &log)
                    .env("DAXFS_CHURN_SEED", format!("{}", round * 131 + w + 1))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                (child, work, log)
            })
            .collect();
        // Every worker under way, then a random while, then the kill.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !workers
            .iter()
            .all(|(_, _, log)| fs::read_to_string(log).is_ok_and(|l| l.contains("E ")))
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the workers never got going"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50 + pace.below(700)));
        f.kill();
        for (mut child, work, log) in workers {
            let status = child.wait().unwrap();
            assert!(status.success(), "round {round}: a worker failed: {status}");
            kept.push((work, log));
        }
        fsck_clean(&img);
        // Over the dead mount: everything every round finished is there.
        let mut m = Mounted::over(&img, &mnt, "");
        for (work, log) in &kept {
            check_churned(work, log);
        }
        // Free a whole earlier round, for the next rounds to reuse.
        if kept.len() > 8 {
            for (work, _) in kept.drain(..4) {
                fs::remove_dir_all(&work).unwrap();
            }
        }
        let out = m.umount();
        assert!(out.status.success(), "round {round}: {}", text(&out));
        fsck_clean(&img);
    }
}

/// `daxfs info --json` shows the journal a killed daemon left (the pending
/// transactions and where they are); a bit flipped in one of them, with
/// intact ones after it, makes `daxfs mount` refuse ("needs a check") and
/// `daxfs fsck` report it (exit 4) until `daxfs fsck --repair` (exit 1).
#[test]
fn a_damaged_journal_is_refused_by_mount_until_fsck_repairs_it() {
    let info = |img: &Path| -> serde_json::Value {
        let out = daxfs(&["info".as_ref(), img.as_os_str(), "--json".as_ref()]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let kill = |f: &mut Foreground| {
        f.kill();
        let c = CString::new(f.mnt.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string; detaching the dead mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    };
    // Changes, then the kill, until at least three transactions are left
    // to replay (the tail moves every few transactions).
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (img, mnt) = (dir.path().join("img"), dir.path().join("mnt"));
    for attempt in 0.. {
        let mut f = Foreground::start_on(&img, &mnt);
        for i in 0..(20 + attempt) {
            fs::write(mnt.join(format!("a{attempt}f{i}")), b"x").unwrap();
        }
        kill(&mut f);
        if info(&img)["layout"]["journal"]["pending_transactions"].as_u64() >= Some(3) {
            break;
        }
        assert!(attempt < 30, "never three transactions to replay");
    }
    let layout = &info(&img)["layout"];
    let journal = &layout["journal"];
    let txs = journal["pending"].as_array().unwrap();
    assert!(txs.len() >= 3, "{journal}");
    assert_eq!(
        journal["pending_transactions"].as_u64(),
        Some(txs.len() as u64)
    );
    assert_eq!(journal["end"], "clean", "{journal}");
    // Flip a bit in the middle of the second pending transaction.
    let ring = journal["ring"]["offset"].as_u64().unwrap();
    let at =
        ring + txs[1]["ring_offset"].as_u64().unwrap() + txs[1]["length"].as_u64().unwrap() / 2;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 4], at).unwrap();
    drop(file);
    let journal = &info(&img)["layout"]["journal"];
    assert!(
        journal["end"].as_str().unwrap().starts_with("damaged"),
        "{journal}"
    );
    let out = daxfs(&["mount".as_ref(), img.as_os_str(), mnt.as_os_str()]);
    assert!(!out.status.success(), "a damaged journal mounted");
    assert!(text(&out).contains("needs a check"), "{}", text(&out));
    assert!(!is_mounted(&mnt));
    assert_eq!(info(&img)["layout"]["needs_check"], true);
    let out = daxfs(&["fsck".as_ref(), img.as_os_str()]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let out = daxfs(&["fsck".as_ref(), img.as_os_str(), "--repair".as_ref()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    fsck_clean(&img);
    assert_eq!(info(&img)["layout"]["needs_check"], false);
    let mut m = Mounted::over(&img, &mnt, "");
    assert_eq!(fs::read(m.path("a0f0")).unwrap(), b"x");
    for i in 0..50 {
        fs::write(m.path(&format!("after{i}")), b"y").unwrap();
    }
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    // `daxfs umount` leaves an empty ring.
    let journal = &info(&img)["layout"]["journal"];
    assert_eq!(journal["pending_transactions"], 0, "{journal}");
    assert_eq!(journal["end"], "clean", "{journal}");
}

/// One churn process (run by the test above, through this test binary):
/// works in DAXFS_CHURN_DIR, logs each operation before ("B") and after
/// ("E") to DAXFS_CHURN_LOG, and stops at the first error (the daemon was
/// killed).
#[test]
#[ignore = "a worker of the daemon-kill test, not a test by itself"]
fn churn_worker() {
    let Ok(dir) = std::env::var("DAXFS_CHURN_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::env::var("DAXFS_CHURN_LOG").unwrap())
        .unwrap();
    let mut rng = Xs(std::env::var("DAXFS_CHURN_SEED").unwrap().parse().unwrap());
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let mut dirs: Vec<String> = Vec::new();
    let mut note = |line: String| log.write_all(format!("{line}\n").as_bytes()).unwrap();
    for n in 0u64.. {
        let names: Vec<String> = files.keys().cloned().collect();
        let pick = |rng: &mut Xs| names[rng.below(names.len() as u64) as usize].clone();
        let place = |rng: &mut Xs, dirs: &[String]| match rng.below(dirs.len() as u64 + 1) {
            0 => format!("f{n}"),
            i => format!("{}/f{n}", dirs[i as usize - 1]),
        };
        let choice = if names.is_empty() { 0 } else { rng.below(100) };
        let r: std::io::Result<()> = match choice {
            0..=39 => {
                // A new file, or more bytes for an old one; fsync'd.
                let name = if names.is_empty() || rng.below(2) == 0 {
                    place(&mut rng, &dirs)
                } else {
                    pick(&mut rng)
                };
                let mut body = files.get(&name).cloned().unwrap_or_default();
                let most = if rng.below(8) == 0 { 900_000 } else { 20_000 };
                let more = 1 + rng.below(most);
                body.extend((0..more).map(|i| (i * 7 + n) as u8));
                note(format!("B W {name}"));
                OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(dir.join(&name))
                    .and_then(|mut f| f.write_all(&body).and_then(|()| f.sync_all()))
                    .map(|()| {
                        note(format!("E W {name} {} {}", body.len(), fnv(&body)));
                        files.insert(name, body);
                    })
            }
            40..=54 => {
                let name = pick(&mut rng);
                let key = ["s", "m", "l"][rng.below(3) as usize];
                let value: Vec<u8> = (0..rng.below(2000)).map(|i| (i + n) as u8).collect();
                note(format!("B X {name}"));
                let (c, k) = (
                    CString::new(dir.join(&name).as_os_str().as_bytes()).unwrap(),
                    CString::new(format!("user.{key}")).unwrap(),
                );
                // SAFETY: valid C strings and a value of the length given.
                let rc = unsafe {
                    libc::setxattr(
                        c.as_ptr(),
                        k.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    )
                };
                if rc == 0 {
                    note(format!("E X {name} {key} {}", fnv(&value)));
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            55..=69 => {
                let (from, to) = (pick(&mut rng), place(&mut rng, &dirs));
                note(format!("B R {from} {to}"));
                fs::rename(dir.join(&from), dir.join(&to)).map(|()| {
                    note(format!("E R {from} {to}"));
                    let body = files.remove(&from).unwrap();
                    files.insert(to, body);
                })
            }
            70..=84 => {
                let name = pick(&mut rng);
                note(format!("B U {name}"));
                fs::remove_file(dir.join(&name)).map(|()| {
                    note(format!("E U {name}"));
                    files.remove(&name);
                })
            }
            85..=92 if dirs.len() < 3 => {
                let d = format!("d{n}");
                note(format!("B M {d}"));
                fs::create_dir(dir.join(&d)).map(|()| {
                    note(format!("E M {d}"));
                    dirs.push(d);
                })
            }
            _ => {
                let empty = dirs
                    .iter()
                    .position(|d| !files.keys().any(|f| f.starts_with(&format!("{d}/"))));
                match empty {
                    Some(i) => {
                        let d = dirs[i].clone();
                        note(format!("B D {d}"));
                        fs::remove_dir(dir.join(&d)).map(|()| {
                            note(format!("E D {d}"));
                            dirs.remove(i);
                        })
                    }
                    None => Ok(()),
                }
            }
        };
        if r.is_err() {
            // The daemon is gone (ENOTCONN), or dying: stop.
            return;
        }
    }
}

#[test]
fn poison_injected_through_the_mount_gives_eio_and_sigbus_until_a_write_clears_it() {
    let m = Mounted::new("");
    let path = m.path("victim");
    let body: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    fs::write(&path, &body).unwrap();
    let run = |args: &[&str]| {
        let mut all: Vec<&std::ffi::OsStr> = vec![args[0].as_ref(), m.mnt.as_os_str()];
        all.extend(args[1..].iter().map(std::ffi::OsStr::new));
        let out = daxfs(&all);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = run(&["inject-error", "--file", "victim", "--offset", "8192"]);
    assert!(said.contains("owner: inode"), "{said}");
    assert!(said.contains("file offset 8192"), "{said}");

    // read(): the good bytes, then EIO.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = f.read_at(&mut buf, 0).unwrap();
    assert_eq!(n, 8192, "a short read up to the poison");
    assert_eq!(&buf[..n], &body[..n]);
    let err = f.read_at(&mut buf, 8192).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(
        f.read_at(&mut buf[..100], 20000).unwrap(),
        100,
        "other pages read fine"
    );

    // A mapped load of the poisoned page raises SIGBUS (in a child).
    // SAFETY: a shared read-only mapping of an open file, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let load_in_child = |at: usize| {
        assert!(at < 65536);
        // SAFETY: inside the 64 KiB mapping, which lives until the munmap below.
        unsafe { load_in_child((map as *const u8).add(at)) }
    };
    assert_eq!(load_in_child(8192), libc::SIGBUS, "a mapped load of poison");
    assert_eq!(load_in_child(0), 0, "a clean page maps fine");

    let listed = run(&["list", "--media-errors"]);
    let json: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(json["badblock_count"], 1, "{listed}");
    let stat = run(&["stat"]);
    assert!(stat.contains("poison events:   1"), "{stat}");

    // A write over the whole poisoned sector clears it; the data reads back.
    f.write_all_at(&[9u8; 512], 8192).unwrap();
    let n = f.read_at(&mut buf, 0).unwrap();
    assert_eq!(n, 65536);
    assert_eq!(&buf[8192..8704], &[9u8; 512][..]);
    assert_eq!(load_in_child(8192), 0, "the mapping works again");
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(map, 65536) };

    // Inject and clear round trip; a hole has no block to poison.
    run(&[
        "inject-error",
        "--file",
        "victim",
        "--offset",
        "30000",
        "--count",
        "2",
    ]);
    let listed = run(&["list", "--media-errors"]);
    assert!(
        listed.contains("\"badblock_count\": 2"),
        "sectors: {listed}"
    );
    assert!(run(&["clear-errors", "--all"]).contains("cleared 2 sectors"));
    let listed = run(&["list", "--media-errors"]);
    assert!(listed.contains("\"badblock_count\": 0"), "{listed}");
    let out = daxfs(&[
        "inject-error".as_ref(),
        m.mnt.as_os_str(),
        "--file".as_ref(),
        "victim".as_ref(),
        "--offset".as_ref(),
        "1000000".as_ref(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("past the end"),
        "{}",
        text(&out)
    );
    let extents = daxfs(&["extents".as_ref(), path.as_os_str()]);
    assert!(
        String::from_utf8_lossy(&extents.stdout).contains("/victim: 1 extent"),
        "{}",
        text(&extents)
    );
    drop(f);
}

/// Fork a child that loads the byte at `at` and exits: the signal that
/// killed it, or 0.
///
/// # Safety
/// `at` is inside a mapping of this process (a load of it may raise
/// SIGBUS, which kills only the child).
unsafe fn load_in_child(at: *const u8) -> i32 {
    // SAFETY: the child only loads a byte of a mapping (the caller's
    // contract) and exits; it touches no lock or allocation of the
    // (multi-threaded) parent.
    match unsafe { libc::fork() } {
        0 => unsafe {
            std::ptr::read_volatile(at);
            libc::_exit(0)
        },
        pid => {
            let mut status = 0;
            // SAFETY: waiting for the child just forked.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFSIGNALED(status) {
                libc::WTERMSIG(status)
            } else {
                0
            }
        }
    }
}

/// `daxfs inject-error` answers only once the kernel's cached pages of the
/// poisoned range are dropped (as Linux's memory failure has finished with
/// every mapping when the injecting call returns), so the very next mapped
/// access raises SIGBUS. On a disk-backed image, where the daemon is
/// slowest, and with the machine loaded, this failed within 30 rounds
/// while the answer came before the invalidation.
#[test]
fn inject_error_returns_after_the_kernels_cached_pages_are_dropped() {
    let m = Mounted::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")), "");
    let body = vec![7u8; 65536];
    for round in 0..100 {
        let name = format!("v{round}");
        fs::write(m.path(&name), &body).unwrap();
        let f = File::open(m.path(&name)).unwrap();
        // SAFETY: a shared read-only mapping of an open file, populated (the
        // kernel caches its pages), unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                65536,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let out = daxfs(&[
            "inject-error".as_ref(),
            m.mnt.as_os_str(),
            "--file".as_ref(),
            name.as_ref(),
            "--offset".as_ref(),
            "8192".as_ref(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        // SAFETY: inside the 64 KiB mapping, unmapped only below.
        let signal = unsafe { load_in_child((map as *const u8).add(8192)) };
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(map, 65536) };
        assert_eq!(
            signal,
            libc::SIGBUS,
            "round {round}: a mapped load right after inject-error read a stale cached page"
        );
    }
}

#[test]
fn seek_data_and_hole_copy_file_range_and_long_listings() {
    let m = Mounted::new("");
    let path = m.path("holey");
    let f = File::create(&path).unwrap();
    f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
    f.write_all_at(&[2u8; 4096], 3 << 20).unwrap();
    f.set_len(4 << 20).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: lseek on an open descriptor.
    let seek = |offset: i64, whence: i32| unsafe { libc::lseek(fd, offset, whence) };
    // Small files get 4 KiB blocks; a file past 2 MiB gets whole 2 MiB
    // regions, so data starts at a 2 MiB boundary at the latest.
    let first_data = seek(0, libc::SEEK_DATA);
    assert!((0..=1 << 20).contains(&first_data), "{first_data}");
    if first_data > 0 {
        assert_eq!(seek(0, libc::SEEK_HOLE), 0, "the file starts with a hole");
    }
    let hole = seek(first_data, libc::SEEK_HOLE);
    assert!(hole > 1 << 20 && hole <= 3 << 20, "{hole}");
    let data = seek(hole, libc::SEEK_DATA);
    assert!(data > hole && data <= 3 << 20, "{data}");
    assert_eq!(seek(4 << 20, libc::SEEK_DATA), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENXIO)
    );

    // copy_file_range copies exactly.
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    fs::write(m.path("src"), &body).unwrap();
    let src = File::open(m.path("src")).unwrap();
    let dst = File::create(m.path("dst")).unwrap();
    let (mut off_in, mut off_out) = (1000i64, 0i64);
    // SAFETY: two open descriptors and offsets that live across the call.
    let n = unsafe {
        libc::copy_file_range(
            std::os::fd::AsRawFd::as_raw_fd(&src),
            &mut off_in,
            std::os::fd::AsRawFd::as_raw_fd(&dst),
            &mut off_out,
            200_000,
            0,
        )
    };
    assert_eq!(n, 200_000, "{}", std::io::Error::last_os_error());
    assert!(fs::read(m.path("dst")).unwrap() == body[1000..201_000]);

    // A directory listing longer than one reply buffer, twice.
    fs::create_dir(m.path("many")).unwrap();
    for i in 0..2000 {
        File::create(m.path(&format!("many/entry-with-a-longish-name-{i:05}"))).unwrap();
    }
    for _ in 0..2 {
        let mut names: Vec<String> = fs::read_dir(m.path("many"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 2000);
        let meta = fs::metadata(m.path("many/entry-with-a-longish-name-01999")).unwrap();
        assert!(meta.is_file());
    }
}

#[test]
fn read_only_and_page_cache_mounts_xattrs_and_statfs() {
    let mut m = Mounted::new("cache");
    let path = m.path("f");
    fs::write(&path, b"through the page cache").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"through the page cache");
    // Extended attributes through the kernel.
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new("user.colour").unwrap();
    // SAFETY: valid C strings and a buffer of the length given.
    let r = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"blue".as_ptr().cast(), 4, 0) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let mut buf = [0u8; 16];
    // SAFETY: as above.
    let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    assert_eq!(&buf[..n as usize], b"blue");
    // statfs: the image's size and free space.
    let mnt = CString::new(m.mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: a zeroed statvfs filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(mnt.as_ptr(), &mut st) }, 0);
    let total = st.f_blocks * st.f_frsize;
    assert!(total > 900 << 20 && total <= 1 << 30, "{total}");
    assert!(st.f_bfree > 0 && st.f_bfree < st.f_blocks);
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));

    m.mount("ro");
    assert_eq!(fs::read(&path).unwrap(), b"through the page cache");
    let err = fs::write(m.path("g"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

/// An image nobody may write (immutable: not even root), left by a killed
/// daemon with transactions to replay: `fsck` checks it (exit 0), `info`
/// describes it, and `mount -o ro` serves it with the journal replayed in
/// the daemon's memory; not one byte of it changes. (The seed report: all
/// three refused a read-only image, and a plain fsck wrote to a writable
/// one.)
#[test]
fn a_read_only_image_is_checked_described_and_mounted_read_only() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (img, mnt) = (dir.path().join("img"), dir.path().join("mnt"));
    let mut f = Foreground::start_on(&img, &mnt);
    for i in 0..40 {
        fs::write(mnt.join(format!("f{i}")), vec![i as u8; 5000 + i]).unwrap();
    }
    f.kill();
    let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; detaching the dead mount.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    drop(f);
    let before = fs::read(&img).unwrap();
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .arg(&img)
            .status()
            .unwrap()
            .success()
    };
    assert!(chattr("+i"));
    struct Mutable<F: Fn(&str) -> bool>(F);
    impl<F: Fn(&str) -> bool> Drop for Mutable<F> {
        fn drop(&mut self) {
            (self.0)("-i");
        }
    }
    let _mutable = Mutable(chattr);
    let out = daxfs(&["fsck".as_ref(), img.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("replayed"), "{}", text(&out));
    let out = daxfs(&["info".as_ref(), img.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = daxfs(&["fsck".as_ref(), img.as_os_str(), "--repair".as_ref()]);
    assert_eq!(out.status.code(), Some(8), "a repair must write");
    let mut m = Mounted::over(&img, &mnt, "ro");
    for i in [0usize, 17, 39] {
        assert_eq!(
            fs::read(mnt.join(format!("f{i}"))).unwrap(),
            vec![i as u8; 5000 + i]
        );
    }
    let err = fs::write(mnt.join("g"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    assert!(fs::read(&img).unwrap() == before, "the image changed");
}

/// Limits through the kernel, as write(2) gives them: a write that runs
/// out of space is short (only one that can write nothing is ENOSPC), and
/// what was written is there. (The largest file is tested against tmpfs.)
#[test]
fn limits_through_the_kernel_short_writes_and_enospc() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (img, mnt) = (dir.path().join("small.img"), dir.path().join("mnt"));
    let out = daxfs(&[
        "mkfs".as_ref(),
        img.as_os_str(),
        "--size".as_ref(),
        "32M".as_ref(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let m = Mounted::over(&img, &mnt, "");
    let f = File::create(m.path("big")).unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut at = 0u64;
    let last = loop {
        match f.write_at(&data, at) {
            Ok(n) => {
                assert!(n > 0);
                at += n as u64;
                if n < data.len() {
                    break n;
                }
            }
            Err(e) => panic!("a write failed before the space ran out: {e}"),
        }
    };
    assert!(last < data.len(), "a short write at the end");
    let err = f.write_at(&data, at).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    let back = fs::read(m.path("big")).unwrap();
    assert_eq!(back.len() as u64, at);
    assert!(back.chunks(1 << 20).all(|c| c == &data[..c.len()]));
    drop(m);
    fsck_clean(&img);
}

/// Set-group-ID directories through the kernel, against tmpfs doing the
/// same: a new file gets the directory's group, a new directory its group
/// and the bit.
#[test]
fn setgid_directories_behave_as_on_tmpfs() {
    let m = Mounted::new("");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let outcome = |root: &Path| {
        let d = root.join("sgid");
        fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(0), Some(65534)).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o2775)).unwrap();
        fs::write(d.join("f"), b"x").unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        let f = fs::metadata(d.join("f")).unwrap();
        let sub = fs::metadata(d.join("sub")).unwrap();
        (f.gid(), sub.gid(), sub.mode() & 0o2000)
    };
    let ours = outcome(&m.mnt);
    let theirs = outcome(tmp.path());
    assert_eq!(theirs, (65534, 65534, 0o2000), "tmpfs, the reference");
    assert_eq!(ours, theirs);
}

/// A write by an unprivileged user drops set-user-ID, and set-group-ID
/// unless group-execute is clear and the writer is in the file's group
/// (then Linux keeps it), in the default direct-I/O mode too; so do a
/// truncate and a fallocate (the kernel asks for those itself): the same
/// steps on tmpfs are the reference. A write by root keeps them.
#[test]
fn setid_bits_go_on_an_unprivileged_write_as_on_tmpfs() {
    let m = Mounted::new("allow_other");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let outcome = |root: &Path| {
        let mut modes = Vec::new();
        for (name, mode, gid, how) in [
            ("a", 0o6777, 0, "printf y >>"),
            ("b", 0o6767, 0, "printf y >>"),
            ("c", 0o4777, 0, "printf y >>"),
            ("d", 0o6767, 65534, "printf y >>"),
            ("e", 0o6777, 0, "truncate -s 10"),
            ("f", 0o6777, 0, "fallocate -l 8192"),
        ] {
            let path = root.join(name);
            fs::write(&path, b"x").unwrap();
            std::os::unix::fs::chown(&path, Some(0), Some(gid)).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let out = as_nobody("sh")
                .arg("-c")
                .arg(format!("{how} {name}"))
                .current_dir(root)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out));
            modes.push(fs::metadata(&path).unwrap().mode() & 0o7777);
        }
        // Root's write keeps them.
        let path = root.join("r");
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o6777)).unwrap();
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"y")
            .unwrap();
        modes.push(fs::metadata(&path).unwrap().mode() & 0o7777);
        modes
    };
    let theirs = outcome(tmp.path());
    assert_eq!(
        theirs,
        vec![0o777, 0o767, 0o777, 0o2767, 0o777, 0o777, 0o6777],
        "tmpfs, the reference"
    );
    assert_eq!(outcome(&m.mnt), theirs);
}

/// `mknod(2)` at `path` (the test's own, unchecked: the result is compared).
fn mknod(path: &Path, mode: u32, dev: u64) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; mknod only reads it.
    match unsafe { libc::mknod(c.as_ptr(), mode, dev) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// What `ls -l` would tell of each entry of `dir`, `readdir`'s type with it.
fn listing(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut out: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "lost+found")
        .map(|e| {
            let t = e.file_type().unwrap();
            let kind = [
                (t.is_fifo(), 'p'),
                (t.is_socket(), 's'),
                (t.is_char_device(), 'c'),
                (t.is_block_device(), 'b'),
                (t.is_dir(), 'd'),
                (t.is_symlink(), 'l'),
                (t.is_file(), '-'),
            ]
            .iter()
            .find(|k| k.0)
            .map_or('?', |k| k.1);
            let m = fs::symlink_metadata(e.path()).unwrap();
            // (Times set by the test, not those of the moment.)
            let mtime = Some(m.mtime()).filter(|&t| t < 1_500_000_000);
            format!(
                "{kind} {:?} mode={:o} nlink={} rdev={:x} owner={}:{} mtime={:?}",
                e.file_name(),
                m.mode(),
                m.nlink(),
                m.rdev(),
                m.uid(),
                m.gid(),
                mtime
            )
        })
        .collect();
    out.sort();
    out
}

/// FIFOs, Unix sockets and device nodes through the kernel, the same steps
/// on tmpfs the reference: made by mkfifo, mknod and bind (and mkfifo by an
/// unprivileged user, whose mknod of a device is refused); data through the
/// FIFO, the socket and the device (`-o dev`); every call that takes any
/// file (link, rename over, unlink, chmod, chown, utimensat); the types and
/// device numbers still there after a remount, and fsck clean.
#[test]
fn special_files_behave_as_on_tmpfs() {
    use std::os::unix::net::{UnixListener, UnixStream};
    let mut m = Mounted::new("allow_other,dev");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let outcome = |root: &Path| {
        let at = |name: &str| root.join(name);
        let fifo = CString::new(at("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
        mknod(&at("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)).unwrap();
        mknod(&at("loop"), libc::S_IFBLK | 0o600, libc::makedev(7, 0x1234)).unwrap();
        mknod(&at("plain"), libc::S_IFREG | 0o600, 0).unwrap();
        let listener = UnixListener::bind(at("sock")).unwrap();

        // Data through each: the kernel's business, nothing refused.
        let writer = {
            let path = at("fifo");
            std::thread::spawn(move || fs::write(path, b"through the pipe").unwrap())
        };
        let piped = fs::read(at("fifo")).unwrap();
        writer.join().unwrap();
        assert_eq!(piped, b"through the pipe");
        let mut client = UnixStream::connect(at("sock")).unwrap();
        client.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        listener.accept().unwrap().0.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        fs::write(at("null"), b"gone").unwrap();
        assert_eq!(fs::read(at("null")).unwrap(), b"");

        // The calls that take any file.
        fs::hard_link(at("fifo"), at("fifo2")).unwrap();
        fs::rename(at("plain"), at("fifo2")).unwrap(); // a file over a FIFO
        fs::rename(at("null"), at("null2")).unwrap();
        fs::set_permissions(at("loop"), fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::lchown(at("sock"), Some(65534), Some(65534)).unwrap();
        let times = [
            libc::timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: 1_234_567_890,
                tv_nsec: 0,
            },
        ];
        for name in ["fifo", "null2", "loop", "sock"] {
            let c = CString::new(at(name).as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid C string and two timespecs.
            let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
            assert_eq!(r, 0, "{name}: {}", std::io::Error::last_os_error());
        }

        // An unprivileged user makes FIFOs, never device nodes.
        fs::create_dir(at("shared")).unwrap();
        fs::set_permissions(at("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
        let run = |script: &str| {
            let out = as_nobody("sh")
                .args(["-c", script])
                .current_dir(at("shared"))
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).contains("not permitted"),
            )
        };
        let nobody = (run("mkfifo p"), run("mknod c c 1 3"), run("mknod b b 7 1"));
        let mut all = listing(root);
        all.extend(listing(&at("shared")));
        drop(listener);
        fs::remove_file(at("loop")).unwrap();
        (all, nobody, listing(root))
    };
    let theirs = outcome(tmp.path());
    assert_eq!(
        theirs.1,
        ((Some(0), false), (Some(1), true), (Some(1), true)),
        "tmpfs, the reference"
    );
    let ours = outcome(&m.mnt);
    assert_eq!(ours.0, theirs.0);
    assert_eq!(ours.1, theirs.1);
    let kept = ours.2;

    // Kept across an unmount, and fsck finds all well.
    let (img, mnt) = (m.img.clone(), m.mnt.clone());
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    fsck_clean(&img);
    let again = Mounted::over(&img, &mnt, "");
    assert_eq!(listing(&again.mnt), kept);
}

/// The outcome of a call: `Ok` or its errno.
fn errno_of<T>(r: std::io::Result<T>) -> Result<(), i32> {
    r.map(drop).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// `FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS` on `path` (an `int`, as chattr passes it).
fn get_flags(path: &Path) -> std::io::Result<i32> {
    let f = File::open(path)?;
    let mut flags: libc::c_int = 0;
    // SAFETY: the ioctl writes one int through the pointer.
    match unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FS_IOC_GETFLAGS,
            &mut flags,
        )
    } {
        0 => Ok(flags),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn set_flags(path: &Path, flags: i32) -> std::io::Result<()> {
    let f = File::open(path)?;
    let flags: libc::c_int = flags;
    // SAFETY: the ioctl reads one int through the pointer.
    match unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FS_IOC_SETFLAGS,
            &flags,
        )
    } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// `FS_IOC_FSGETXATTR`: the `fsx_xflags` of `path`.
fn get_xflags(path: &Path) -> std::io::Result<u32> {
    const FS_IOC_FSGETXATTR: libc::Ioctl = 0x801c_581f;
    let f = File::open(path)?;
    let mut fsx = [0u32; 7];
    // SAFETY: the ioctl writes a 28-byte struct fsxattr through the pointer.
    match unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            FS_IOC_FSGETXATTR,
            fsx.as_mut_ptr(),
        )
    } {
        0 => Ok(fsx[0]),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn utimens(path: &Path, times: Option<[i64; 2]>) -> std::io::Result<()> {
    let ts = times.map(|t| {
        t.map(|s| libc::timespec {
            tv_sec: s,
            tv_nsec: 0,
        })
    });
    let ptr = ts.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: a valid C string and, when given, two timespecs.
    match unsafe { libc::utimensat(libc::AT_FDCWD, c_path(path).as_ptr(), ptr, 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// chattr's flags through the kernel, tmpfs the reference: immutable and
/// append-only refuse what they refuse on Linux (data, attributes, names,
/// xattrs; a directory's entries), nodump and noatime are kept, any other
/// flag is refused; an unprivileged owner may set nodump but not
/// immutable; FS_IOC_FSGETXATTR agrees; the flags survive a remount.
#[test]
fn chattr_flags_are_enforced_as_on_tmpfs() {
    const IMMUTABLE: i32 = 0x10;
    const APPEND: i32 = 0x20;
    const NODUMP: i32 = 0x40;
    const NOATIME: i32 = 0x80;
    const COMPRESS: i32 = 0x4;
    let mut m = Mounted::new("allow_other");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let outcome = |root: &Path| {
        let at = |name: &str| root.join(name);
        let mut seen: Vec<(String, Result<(), i32>)> = Vec::new();
        let mut note = |what: &str, r: Result<(), i32>| seen.push((what.to_string(), r));
        fs::write(at("f"), b"hi").unwrap();
        fs::write(at("other"), b"o").unwrap();
        fs::create_dir(at("d")).unwrap();
        fs::write(at("d/x"), b"x").unwrap();
        // Each change a flagged file refuses, then the flag cleared.
        let attempts = |flag: &str, note: &mut dyn FnMut(&str, Result<(), i32>)| {
            let f = at("f");
            let mut try_ = |what: &str, r: Result<(), i32>| note(&format!("{flag} {what}"), r);
            try_(
                "open write",
                errno_of(OpenOptions::new().write(true).open(&f)),
            );
            try_(
                "append",
                errno_of(
                    OpenOptions::new()
                        .append(true)
                        .open(&f)
                        .and_then(|mut h| h.write_all(b"+")),
                ),
            );
            try_("read", errno_of(fs::read(&f)));
            try_(
                "truncate",
                errno_of(
                    File::options()
                        .write(true)
                        .open(&f)
                        .and_then(|h| h.set_len(0)),
                ),
            );
            try_(
                "chmod",
                errno_of(fs::set_permissions(&f, fs::Permissions::from_mode(0o600))),
            );
            try_(
                "chown",
                errno_of(std::os::unix::fs::chown(&f, Some(1), None)),
            );
            try_("touch", errno_of(utimens(&f, None)));
            try_("utimes", errno_of(utimens(&f, Some([1, 2]))));
            let name = c_path(&f);
            // SAFETY: valid C strings and a value of the given length.
            let r = unsafe {
                libc::setxattr(
                    name.as_ptr(),
                    c"user.k".as_ptr(),
                    b"v".as_ptr().cast(),
                    1,
                    0,
                )
            };
            try_(
                "setxattr",
                if r == 0 {
                    Ok(())
                } else {
                    errno_of(Err::<(), _>(std::io::Error::last_os_error()))
                },
            );
            try_("link", errno_of(fs::hard_link(&f, at("f2"))));
            try_("rename", errno_of(fs::rename(&f, at("g"))));
            try_("rename over", errno_of(fs::rename(at("other"), &f)));
            try_("unlink", errno_of(fs::remove_file(&f)));
        };
        note("set immutable", errno_of(set_flags(&at("f"), IMMUTABLE)));
        note(
            "xflags immutable",
            errno_of(get_xflags(&at("f")).map(|x| assert_eq!(x & 0x8, 0x8))),
        );
        attempts("immutable", &mut note);
        note("clear", errno_of(set_flags(&at("f"), 0)));
        note("set append", errno_of(set_flags(&at("f"), APPEND)));
        attempts("append-only", &mut note);
        note("clear", errno_of(set_flags(&at("f"), 0)));
        // Directories.
        note("dir immutable", errno_of(set_flags(&at("d"), IMMUTABLE)));
        note(
            "immutable dir: create",
            errno_of(fs::write(at("d/new"), b"")),
        );
        note(
            "immutable dir: unlink",
            errno_of(fs::remove_file(at("d/x"))),
        );
        note(
            "immutable dir: mkdir",
            errno_of(fs::create_dir(at("d/sub"))),
        );
        note("dir append", errno_of(set_flags(&at("d"), APPEND)));
        note("append dir: create", errno_of(fs::write(at("d/new"), b"")));
        note("append dir: unlink", errno_of(fs::remove_file(at("d/x"))));
        note(
            "append dir: rename",
            errno_of(fs::rename(at("d/x"), at("d/y"))),
        );
        note("dir clear", errno_of(set_flags(&at("d"), 0)));
        // Kept flags, a refused one, an unprivileged owner.
        note(
            "nodump noatime",
            errno_of(set_flags(&at("f"), NODUMP | NOATIME)),
        );
        let kept = get_flags(&at("f")).unwrap() & (IMMUTABLE | APPEND | NODUMP | NOATIME);
        note("compress", errno_of(set_flags(&at("f"), COMPRESS)));
        fs::write(at("mine"), b"").unwrap();
        std::os::unix::fs::chown(at("mine"), Some(65534), Some(65534)).unwrap();
        let chattr = |flag: &str| {
            let out = as_nobody("chattr")
                .arg(flag)
                .arg(at("mine"))
                .output()
                .unwrap();
            out.status.success()
        };
        let nobody = (chattr("+d"), chattr("+i"), chattr("+a"));
        let flags_of =
            |name: &str| get_flags(&at(name)).unwrap() & (IMMUTABLE | APPEND | NODUMP | NOATIME);
        let mine = flags_of("mine");
        set_flags(&at("d"), APPEND).unwrap();
        (seen, kept, nobody, mine)
    };
    let theirs = outcome(tmp.path());
    // (tmpfs's directory goes with its flag cleared.)
    set_flags(&tmp.path().join("d"), 0).unwrap();
    let refused: Vec<&String> = theirs
        .0
        .iter()
        .filter(|s| s.1 == Err(libc::EPERM))
        .map(|s| &s.0)
        .collect();
    assert!(refused.len() >= 20, "tmpfs, the reference: {:?}", theirs.0);
    assert_eq!(
        (theirs.1, theirs.2, theirs.3),
        (NODUMP | NOATIME, (true, false, false), NODUMP)
    );
    let ours = outcome(&m.mnt);
    for (a, b) in ours.0.iter().zip(&theirs.0) {
        assert_eq!(a, b, "daxfs, then tmpfs");
    }
    assert_eq!(ours.0.len(), theirs.0.len());
    assert_eq!((ours.1, ours.2, ours.3), (theirs.1, theirs.2, theirs.3));

    // Kept across a remount; d is still append-only there.
    let (img, mnt) = (m.img.clone(), m.mnt.clone());
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    fsck_clean(&img);
    let again = Mounted::over(&img, &mnt, "");
    assert_eq!(get_flags(&again.path("f")).unwrap(), NODUMP | NOATIME);
    assert_eq!(get_flags(&again.path("d")).unwrap(), APPEND);
    assert_eq!(
        errno_of(fs::remove_file(again.path("d/x"))),
        Err(libc::EPERM)
    );
    set_flags(&again.path("d"), 0).unwrap();
    fs::remove_file(again.path("d/x")).unwrap();
}

/// The control socket of the mount at `m`, as `daxfs stat` names it.
fn control_socket(m: &Mounted) -> PathBuf {
    let out = daxfs(&["stat".as_ref(), m.mnt.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("control socket:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    PathBuf::from(line.trim())
}

/// A line from `pid`'s /proc status ("Threads", "VmRSS"), as a number.
fn proc_status(pid: i32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Another user cannot take the control socket's name or answer for the
/// daemon: with `nobody` listening, before the mount, on every name a
/// user other than root can take (the abstract name daxfs once used, and
/// the fallback directory in /tmp), the mount succeeds, `daxfs stat` gets
/// the daemon's own answer, and with the daemon's socket gone it fails
/// rather than believe nobody's.
#[test]
fn a_squatter_can_neither_block_the_mount_nor_forge_its_answers() {
    let mut m = Mounted::new("");
    let socket = control_socket(&m);
    let name = socket.file_name().unwrap().to_owned();
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    let (img, mnt) = (m.img.clone(), m.mnt.clone());
    let canonical = fs::canonicalize(&mnt).unwrap();

    let fallback = Path::new("/tmp/daxfs-0");
    let ours_to_remove = !fallback.exists();
    let script = r#"
        use IO::Socket::UNIX; use IO::Select; $SIG{PIPE} = "IGNORE";
        my ($abstract, $dir, $name) = @ARGV;
        my @s = (IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => "\0$abstract", Listen => 8)
            or die "abstract: $!");
        if (mkdir($dir, 0777) || -o $dir) {
            chmod 0777, $dir;
            push @s, IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => "$dir/$name", Listen => 8)
                or die "path: $!";
        }
        $| = 1; print scalar(@s), "\n";
        my $sel = IO::Select->new(@s);
        while (my @r = $sel->can_read) {
            for (@r) { my $c = $_->accept or next; my $l = <$c>; print $c "{\"output\":\"forged\\n\"}\n"; close $c; }
        }
    "#;
    let mut squatter = as_nobody("perl")
        .args(["-e", script])
        .arg(format!("daxfs:{}", canonical.display()))
        .arg(fallback)
        .arg(&name)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let listening = first_line(&mut squatter);
    let result = std::panic::catch_unwind(|| {
        assert!(
            listening.trim() == "1" || listening.trim() == "2",
            "{listening}"
        );
        let m = Mounted::over(&img, &mnt, "");
        let out = daxfs(&["stat".as_ref(), mnt.as_os_str()]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(!text(&out).contains("forged"), "{}", text(&out));
        assert_eq!(control_socket(&m), socket);
        // The daemon's socket gone: an error, never nobody's answer.
        fs::remove_file(&socket).unwrap();
        let out = daxfs(&["stat".as_ref(), mnt.as_os_str()]);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(!text(&out).contains("forged"), "{}", text(&out));
        assert!(text(&out).contains("no control socket"), "{}", text(&out));
        // The mount itself serves on.
        fs::write(mnt.join("still"), b"here").unwrap();
        assert_eq!(fs::read(mnt.join("still")).unwrap(), b"here");
    });
    let _ = squatter.kill();
    let _ = squatter.wait();
    if ours_to_remove {
        let _ = fs::remove_dir_all(fallback);
    }
    result.unwrap();
}

/// The daemon reads at most 4 KiB of a request and answers that it is too
/// long; a thousand idle connections cost it no thread, and the mount's
/// owner is still answered while they stay open.
#[test]
fn the_control_socket_bounds_requests_and_idle_connections() {
    use std::os::unix::net::UnixStream;
    let m = Mounted::new("");
    let socket = control_socket(&m);
    let pid = m.pid.unwrap();

    // 64 MiB without a newline.
    let rss = proc_status(pid, "VmRSS");
    let mut stream = UnixStream::connect(&socket).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..64 {
        if stream.write_all(&chunk).is_err() {
            break; // the daemon stopped reading, as it should
        }
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.contains("request too long"), "{answer:?}");
    let grown_kib = proc_status(pid, "VmRSS").saturating_sub(rss);
    assert!(grown_kib < 16 << 10, "the daemon grew by {grown_kib} KiB");

    // A thousand idle connections (the descriptor limit raised for them).
    raise_open_files(8192);
    let threads = proc_status(pid, "Threads");
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let out = daxfs(&["stat".as_ref(), m.mnt.as_os_str()]);
    assert!(out.status.success(), "with the flood open: {}", text(&out));
    let during = proc_status(pid, "Threads");
    assert!(
        during < threads + 4,
        "{threads} threads, {during} with the flood"
    );
    fs::write(m.path("served"), b"yes").unwrap();
    assert_eq!(fs::read(m.path("served")).unwrap(), b"yes");
    drop(idle);
    let out = daxfs(&["stat".as_ref(), m.mnt.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out));
}

/// SEEK_DATA and SEEK_HOLE at offsets outside the file give what tmpfs
/// gives (and ext4 and XFS through iomap): ENXIO below 0 and at or past
/// the end.
#[test]
fn seek_data_and_hole_outside_the_file_as_on_tmpfs() {
    let m = Mounted::new("");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let outcome = |root: &Path| {
        let f = File::create(root.join("f")).unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let mut seen = Vec::new();
        for offset in [-1i64, -4096, i64::MIN, 0, 8191, 8192, 8193] {
            for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
                // SAFETY: lseek on an open descriptor.
                let at = unsafe { libc::lseek(fd, offset, whence) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                seen.push((offset, whence, at, if at < 0 { errno } else { None }));
            }
        }
        seen
    };
    let theirs = outcome(tmp.path());
    assert_eq!(
        theirs[0],
        (-1, libc::SEEK_DATA, -1, Some(libc::ENXIO)),
        "tmpfs"
    );
    assert_eq!(outcome(&m.mnt), theirs);
}

/// The largest file Linux allows (2^63 - 1 bytes), sparse, through the
/// kernel, tmpfs doing the same the reference: truncate to it and to one
/// byte more, writes at, across and past its end, far-apart blocks, seeks
/// for data and holes; then the same across a remount, and fsck is clean.
#[test]
fn the_largest_file_linux_allows_as_on_tmpfs() {
    let mut m = Mounted::new("");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let max = i64::MAX as u64;
    let spots = [0, 16 << 40, (1 << 47) * 4096 + 9, max - 4, max - 1];
    // Seeks for data and holes: daxfs maps a large file's blocks 2 MiB at
    // a time (zeroed, so data to SEEK_DATA, as the VFS allows), so its
    // answer may lie past tmpfs's, within the bounds given: where the seek
    // starts, what tmpfs finds, and where the next written byte or hole is.
    let seeks = [
        (1 << 20, libc::SEEK_DATA, 16 << 40, (1 << 20)..=16 << 40),
        (4096, libc::SEEK_HOLE, 4096, 4096..=(16 << 40) - 1),
        (
            (16 << 40) + 4096,
            libc::SEEK_DATA,
            (1 << 47) * 4096,
            ((16 << 40) + 4096)..=(1 << 47) * 4096,
        ),
        (max - 4, libc::SEEK_HOLE, max - 4, (max - 4)..=max - 4),
    ];
    let outcome = |root: &Path| {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(root.join("huge"))
            .unwrap();
        let mut seen = vec![
            format!("{:?}", errno_of(f.set_len(max))),
            format!("{:?}", errno_of(f.set_len(max + 1))),
            format!("{}", f.metadata().unwrap().len()),
        ];
        for (i, &at) in spots.iter().enumerate() {
            let data = format!("spot {i}");
            seen.push(format!(
                "{:?}",
                f.write_at(data.as_bytes(), at)
                    .map_err(|e| e.raw_os_error())
            ));
        }
        seen.push(format!(
            "{:?}",
            f.write_at(b"x", max).map_err(|e| e.raw_os_error())
        ));
        for &at in &spots {
            // (Up to the end: past it the kernel refuses the range.)
            let mut back = [0u8; 8];
            let len = 8.min(max - at) as usize;
            let n = f.read_at(&mut back[..len], at).unwrap();
            seen.push(format!("{:?}", &back[..n]));
        }
        seen.push(format!("{}", f.metadata().unwrap().len()));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let seeks = seeks.clone().map(|(offset, whence, ..)| {
            // SAFETY: lseek on an open descriptor.
            unsafe { libc::lseek(fd, offset as i64, whence) as u64 }
        });
        (seen, seeks)
    };
    let (theirs, their_seeks) = outcome(tmp.path());
    assert_eq!(theirs[0], "Ok(())", "tmpfs takes the largest size");
    let (ours, our_seeks) = outcome(&m.mnt);
    assert_eq!(ours, theirs, "daxfs, then tmpfs");
    for (i, (from, whence, found, bounds)) in seeks.into_iter().enumerate() {
        assert_eq!(their_seeks[i], found, "tmpfs: seek {whence} from {from}");
        assert!(
            bounds.contains(&our_seeks[i]),
            "seek {whence} from {from}: {} (tmpfs {found})",
            our_seeks[i]
        );
    }
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    fsck_clean(&m.img);
    m.mount("");
    let f = File::open(m.path("huge")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), max);
    let mut back = [0u8; 6];
    f.read_at(&mut back, (1 << 47) * 4096 + 9).unwrap();
    assert_eq!(&back, b"spot 2", "kept across the remount");
}

/// An idmapped bind mount of `source` at `target` (the mount API:
/// open_tree, mount_setattr with MOUNT_ATTR_IDMAP, move_mount) mapping ids
/// `0..1000` of the filesystem to `10000..11000`; detached when dropped.
struct Idmapped {
    target: PathBuf,
}

impl Idmapped {
    fn new(source: &Path, target: &Path) -> std::io::Result<Idmapped> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        fs::create_dir_all(target).unwrap();
        // A user namespace holding the mapping: a shell that says when it
        // is in it, and waits on its standard input.
        let mut ns = Command::new("unshare")
            .args(["--user", "sh", "-c", "echo in; exec cat"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert_eq!(first_line(&mut ns), "in\n");
        for map in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{}/{map}", ns.id()), "0 10000 1000\n").unwrap();
        }
        let userns = File::open(format!("/proc/{}/ns/user", ns.id())).unwrap();
        drop(ns.stdin.take());
        ns.wait().unwrap();
        let last = || std::io::Error::last_os_error();
        let (src, dst) = (c_path(source), c_path(target));
        // SAFETY: a valid C string; the call returns a new descriptor or -1.
        let tree = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                src.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as u32,
            )
        };
        if tree < 0 {
            return Err(last());
        }
        // SAFETY: a descriptor open_tree just returned, owned here alone.
        let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        // SAFETY: an open descriptor, an empty C string, and a mount_attr
        // of the size passed, which the call only reads.
        let set = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if set < 0 {
            return Err(last());
        }
        // SAFETY: an open descriptor and valid C strings, only read.
        let moved = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if moved < 0 {
            return Err(last());
        }
        Ok(Idmapped {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for Idmapped {
    fn drop(&mut self) {
        let c = c_path(&self.target);
        // SAFETY: a valid C string; detaching a mount this test made.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

const OPEN_TREE_CLONE: u32 = 1;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// The kernel's `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Idmapped mounts (FUSE_ALLOW_IDMAP, Linux 6.12 and later): owners seen
/// through the mount are mapped, files a mapped user makes there are
/// stored with the filesystem's ids, ACL entries and chown are mapped,
/// permissions follow the mapped owner, an unmapped caller may not create,
/// and a write there drops set-user-ID; tmpfs doing the same steps is the
/// reference. What was stored is kept across a remount, and fsck is clean.
#[test]
fn idmapped_mounts_map_owners_as_on_tmpfs() {
    let mut m = Mounted::new("allow_other");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let maps = tempfile::tempdir_in("/dev/shm").unwrap();
    let outcome = |root: &Path, mapped: &Path| {
        let base = root.join("base");
        fs::create_dir(&base).unwrap();
        fs::write(base.join("root-file"), b"secret").unwrap();
        fs::set_permissions(base.join("root-file"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(base.join("user5"), b"x").unwrap();
        std::os::unix::fs::chown(base.join("user5"), Some(5), Some(6)).unwrap();
        fs::write(base.join("setuid"), b"x").unwrap();
        fs::set_permissions(base.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
        let view = Idmapped::new(&base, mapped).expect("an idmapped mount");
        let owner = |p: &Path| {
            fs::symlink_metadata(p)
                .map(|m| (m.uid(), m.gid()))
                .map_err(|e| e.raw_os_error())
        };
        let as_mapped_root = |script: &str| {
            let out = Command::new("setpriv")
                .args(["--reuid=10000", "--regid=10000", "--clear-groups"])
                .args(["sh", "-c", script])
                .current_dir(mapped)
                .output()
                .unwrap();
            format!(
                "{} {}",
                out.status.success(),
                String::from_utf8_lossy(&out.stdout)
            )
        };
        let mut seen = vec![
            format!("{:?}", owner(&mapped.join("root-file"))),
            format!("{:?}", owner(&mapped.join("user5"))),
            // Through the mount, host uid 10000 is the owner of what uid 0
            // owns: it may read the 0600 file, and may not without it.
            as_mapped_root("cat root-file"),
            as_mapped_root(&format!("cat {}", base.join("root-file").display())),
            as_mapped_root("touch made && mkdir dir && ln -s made link && mkfifo fifo && echo ok"),
            as_mapped_root("setfacl -m u:10005:r made && echo ok"),
            as_mapped_root("printf y >> setuid && echo ok"),
        ];
        for name in ["made", "dir", "link", "fifo"] {
            seen.push(format!("{name} {:?}", owner(&base.join(name))));
            seen.push(format!("{name} {:?}", owner(&mapped.join(name))));
        }
        let acl = Command::new("getfacl")
            .args(["-n", "--omit-header"])
            .arg(base.join("made"))
            .output()
            .unwrap();
        seen.push(String::from_utf8_lossy(&acl.stdout).into_owned());
        seen.push(format!(
            "{:o}",
            fs::metadata(base.join("setuid")).unwrap().mode() & 0o7777
        ));
        // Root chowns through the mount: stored mapped back; an id with no
        // mapping is refused, and root (unmapped there) may not create.
        let chown = |uid| {
            std::os::unix::fs::chown(mapped.join("made"), Some(uid), Some(uid))
                .map_err(|e| e.raw_os_error())
        };
        seen.push(format!(
            "{:?} {:?}",
            chown(10007),
            owner(&base.join("made"))
        ));
        seen.push(format!("{:?} {:?}", chown(7), owner(&base.join("made"))));
        seen.push(format!(
            "{:?}",
            File::create(mapped.join("by-root")).map_err(|e| e.raw_os_error())
        ));
        drop(view);
        seen
    };
    let theirs = outcome(tmp.path(), &maps.path().join("tmpfs"));
    assert_eq!(theirs[0], "Ok((10000, 10000))", "tmpfs, the reference");
    let ours = outcome(&m.mnt, &maps.path().join("daxfs"));
    assert_eq!(ours, theirs, "daxfs, then tmpfs");
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    fsck_clean(&m.img);
    m.mount("");
    assert_eq!(fs::metadata(m.path("base/made")).unwrap().uid(), 7);
    assert_eq!(fs::metadata(m.path("base/dir")).unwrap().uid(), 0);
}

/// `open(O_TMPFILE)` through the kernel, tmpfs doing the same the
/// reference: an unnamed file (link count 0) that `linkat` names with
/// what was written to it; `O_EXCL` keeps it unnamed (ENOENT); not in a
/// file (ENOTDIR), not read-only (EINVAL), not where the caller may not
/// write (EACCES). What was named is kept across a remount; what was not
/// is freed, and fsck is clean.
#[test]
fn o_tmpfile_and_linkat_as_on_tmpfs() {
    let mut m = Mounted::new("allow_other");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let before = free_inodes(&m.mnt);
    let outcome = |root: &Path| {
        let open_tmp = |dir: &Path, flags: i32| {
            let c = c_path(dir);
            // SAFETY: a valid C string; open returns a descriptor or -1.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | flags, 0o640) };
            match fd {
                -1 => Err(std::io::Error::last_os_error().raw_os_error()),
                // SAFETY: a descriptor open just returned, owned here alone.
                fd => Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
            }
        };
        let link = |f: &File, to: &Path| {
            let from = CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
            let to = c_path(to);
            // SAFETY: valid C strings, only read.
            let r = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            match r {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error().raw_os_error()),
            }
        };
        use std::os::fd::AsRawFd;
        let mut seen = Vec::new();
        let f = open_tmp(root, libc::O_RDWR).unwrap();
        f.write_all_at(b"made unnamed", 0).unwrap();
        let meta = f.metadata().unwrap();
        seen.push(format!("{} {:o} {}", meta.nlink(), meta.mode(), meta.len()));
        seen.push(format!("{:?}", link(&f, &root.join("named"))));
        seen.push(format!(
            "{:?}",
            fs::read(root.join("named")).map_err(|e| e.kind())
        ));
        seen.push(format!("{}", f.metadata().unwrap().nlink()));
        seen.push(format!("{:?}", link(&f, &root.join("again"))));
        let unnamed = open_tmp(root, libc::O_RDWR).unwrap();
        unnamed.write_all_at(&[3u8; 100_000], 0).unwrap();
        let excl = open_tmp(root, libc::O_RDWR | libc::O_EXCL).unwrap();
        seen.push(format!("{:?}", link(&excl, &root.join("excl"))));
        seen.push(format!(
            "{:?}",
            open_tmp(&root.join("named"), libc::O_RDWR).err()
        ));
        seen.push(format!("{:?}", open_tmp(root, libc::O_RDONLY).err()));
        let out = as_nobody("sh")
            .arg("-c")
            .arg("exec 3<>/dev/null; perl -e 'use Fcntl; sysopen(F, \".\", 0x410000|O_RDWR) or die \"$!\\n\"'")
            .current_dir(root)
            .output()
            .unwrap();
        seen.push(String::from_utf8_lossy(&out.stderr).into_owned());
        let mut names: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lost+found")
            .collect();
        names.sort();
        seen.push(names.join(" "));
        seen
    };
    let theirs = outcome(tmp.path());
    assert_eq!(theirs[0], "0 100640 12", "tmpfs, the reference");
    assert_eq!(outcome(&m.mnt), theirs, "daxfs, then tmpfs");
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    fsck_clean(&m.img);
    m.mount("");
    assert_eq!(fs::read(m.path("named")).unwrap(), b"made unnamed");
    assert_eq!(fs::metadata(m.path("named")).unwrap().nlink(), 2);
    assert_eq!(
        free_inodes(&m.mnt),
        before - 1,
        "the unnamed files are freed"
    );
}

/// statx(2)'s birth time: set when a file is made, unchanged by writes,
/// chmod and rename, kept across a remount; tmpfs reports it too.
#[test]
fn statx_reports_the_birth_time_as_tmpfs_does() {
    let mut m = Mounted::new("");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let btime = |path: &Path| {
        let c = c_path(path);
        // SAFETY: an all-zero statx is a valid value; statx fills it.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a statx to fill.
        let r = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c.as_ptr(),
                0,
                libc::STATX_BASIC_STATS | libc::STATX_BTIME,
                &mut st,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        assert_eq!(
            st.stx_mask & libc::STATX_BTIME,
            libc::STATX_BTIME,
            "{}",
            path.display()
        );
        (st.stx_btime.tv_sec, st.stx_btime.tv_nsec)
    };
    // In nanoseconds; the kernel's clock (tmpfs's) is coarse, a tick behind.
    let nanos = |(s, n): (i64, u32)| s as i128 * 1_000_000_000 + n as i128;
    let now = || {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as i128
    };
    for root in [tmp.path(), m.mnt.as_path()] {
        let start = now() - 50_000_000;
        fs::write(root.join("f"), b"x").unwrap();
        fs::create_dir(root.join("d")).unwrap();
        let end = now();
        let born = btime(&root.join("f"));
        let made = (start..=end).contains(&nanos(born));
        assert!(made, "{born:?} not in {start}..{end}: {}", root.display());
        assert!((start..=end).contains(&nanos(btime(&root.join("d")))));
        std::thread::sleep(Duration::from_millis(20));
        fs::write(root.join("f"), b"changed").unwrap();
        fs::set_permissions(root.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(root.join("f"), root.join("g")).unwrap();
        assert_eq!(btime(&root.join("g")), born, "{}", root.display());
    }
    let born = btime(&m.path("g"));
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    m.mount("");
    assert_eq!(btime(&m.path("g")), born, "kept across a remount");
}

/// Raise this process's soft limit of open files to the hard limit (at
/// most `want`).
fn raise_open_files(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(want).max(limit.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// Free inodes of the filesystem mounted at `at`.
fn free_inodes(at: &Path) -> u64 {
    let c = c_path(at);
    // SAFETY: an all-zero statvfs is a valid value; statvfs fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct that lives across the call.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_ffree
}

/// The userspace form of "busy inodes after unmount": 10,000 files
/// unlinked while open, closed, then an unmount (the kernel's plain
/// `umount`, which does not wait for the daemon, and `daxfs umount`, which
/// does) and at once a new mount of the same image at the same place. The
/// new mount succeeds (waiting for the old daemon when it must, and saying
/// so), every one of those inodes is free again, and fsck is clean.
#[test]
fn a_mount_right_after_an_unmount_with_10000_orphans_waits_and_loses_nothing() {
    raise_open_files(16_384);
    for plain in [true, false] {
        let mut m = Mounted::new("");
        let free_before = free_inodes(&m.mnt);
        // The files are held by a child of its own, not this process: a
        // process that another test spawns meanwhile copies this one's
        // descriptor table, and would keep the mount busy until it execs.
        let script = r#"
            my @held;
            for my $i (0..9999) {
                open(my $h, ">", "$ARGV[0]/f$i") or die "f$i: $!";
                unlink("$ARGV[0]/f$i") or die "unlink f$i: $!";
                push @held, $h;
            }
            $| = 1; print scalar(@held), "\n";
            my $go = <STDIN>;
        "#;
        let mut holder = Command::new("perl")
            .args(["-e", script])
            .arg(&m.mnt)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let held = first_line(&mut holder);
        assert_eq!(held.trim(), "10000");
        assert_eq!(free_inodes(&m.mnt), free_before - 10_000, "held while open");
        drop(holder.stdin.take()); // it closes them all as it exits
        assert!(holder.wait().unwrap().success());
        let (img, mnt) = (m.img.clone(), m.mnt.clone());
        if plain {
            let out = Command::new("umount").arg(&mnt).output().unwrap();
            assert!(out.status.success(), "{}", text(&out));
            m.pid = None; // (its end is what the new mount waits for)
        } else {
            let out = m.umount();
            assert!(out.status.success(), "{}", text(&out));
        }
        let again = Mounted::over(&img, &mnt, "");
        assert_eq!(
            free_inodes(&again.mnt),
            free_before,
            "plain umount: {plain}"
        );
        drop(again);
        fsck_clean(&img);
    }
}

/// `getfattr -d -m -` of `path` run by `nobody` (names and values), or by
/// root: the attributes either can see.
fn xattrs_seen(path: &Path, as_root: bool) -> String {
    let mut cmd = if as_root {
        Command::new("getfattr")
    } else {
        as_nobody("getfattr")
    };
    let out = cmd
        .args(["--absolute-names", "-d", "-m", "-"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).replace(&path.display().to_string(), "PATH")
}

/// trusted.* and security.* attributes through the kernel, tmpfs the
/// reference: root sets and reads all three namespaces; nobody cannot set
/// a trusted one, and neither sees it nor finds it listed.
#[test]
fn trusted_and_security_xattrs_as_on_tmpfs() {
    let m = Mounted::new("allow_other");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let outcome = |root: &Path| {
        let f = root.join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        let set = |name: &str, value: &str, root_user: bool| {
            let mut cmd = if root_user {
                Command::new("setfattr")
            } else {
                as_nobody("setfattr")
            };
            cmd.args(["-n", name, "-v", value])
                .arg(&f)
                .status()
                .unwrap()
                .success()
        };
        let made = (
            set("trusted.overlay.opaque", "y", true),
            set("security.label", "s0", true),
            set("user.colour", "blue", true),
            set("trusted.mine", "no", false),
            set("user.theirs", "yes", false),
        );
        (made, xattrs_seen(&f, true), xattrs_seen(&f, false))
    };
    let theirs = outcome(tmp.path());
    assert_eq!(theirs.0, (true, true, true, false, true), "tmpfs");
    assert!(
        theirs.1.contains("trusted.overlay.opaque=\"y\""),
        "{}",
        theirs.1
    );
    assert!(!theirs.2.contains("trusted."), "{}", theirs.2);
    assert_eq!(outcome(&m.mnt), theirs);
}

/// The access time of `path` (seconds, nanoseconds).
fn atime_of(path: &Path) -> (i64, i64) {
    let m = fs::metadata(path).unwrap();
    (m.atime(), m.atime_nsec())
}

/// Access times through the kernel, tmpfs the reference (both relatime by
/// default): a read after the file changed updates it, a second read does
/// not, nor does a read of a file with chattr +A; listing a directory
/// updates the directory's. With `-o noatime` nothing is updated, with
/// `-o strictatime` every read is.
#[test]
fn access_times_follow_relatime_as_on_tmpfs() {
    const OLD: i64 = 1_000_000_000;
    let m = Mounted::new("");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let outcome = |root: &Path| {
        let f = root.join("f");
        fs::write(&f, b"some data").unwrap();
        let d = root.join("d");
        fs::create_dir(&d).unwrap();
        let a = root.join("a");
        fs::write(&a, b"flagged").unwrap();
        for p in [&f, &d, &a] {
            utimens(p, Some([OLD, OLD])).unwrap();
        }
        set_flags(&a, 0x80).unwrap(); // noatime
        fs::read(&f).unwrap();
        let first = atime_of(&f);
        fs::read(&f).unwrap();
        let second = atime_of(&f);
        fs::read(&a).unwrap();
        fs::read_dir(&d).unwrap().for_each(drop);
        (
            first.0 > OLD,
            second == first,
            atime_of(&a).0 == OLD,
            atime_of(&d).0 > OLD,
        )
    };
    let theirs = outcome(tmp.path());
    assert_eq!(theirs, (true, true, true, true), "tmpfs, the reference");
    assert_eq!(outcome(&m.mnt), theirs);
    drop(m);

    // An access time ahead of the clock: later than the file's changes and
    // not a day old, so relatime leaves it, strictatime does not.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 1000;
    for (option, updated) in [("", false), ("noatime", false), ("strictatime", true)] {
        let m = Mounted::new(option);
        let f = m.path("f");
        fs::write(&f, b"x").unwrap();
        utimens(&f, Some([ahead, OLD])).unwrap();
        fs::read(&f).unwrap();
        assert_eq!(atime_of(&f).0 != ahead, updated, "-o {option}");
        // The first read after a change updates it under relatime too.
        fs::write(&f, b"y").unwrap();
        utimens(&f, Some([OLD, OLD])).unwrap();
        fs::read(&f).unwrap();
        assert_eq!(atime_of(&f).0 != OLD, option != "noatime", "-o {option}");
    }
}

/// `renameat2` with `flags`, relative to the current directory.
fn rename2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (from, to) = (c_path(from), c_path(to));
    // SAFETY: two valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// RENAME_WHITEOUT (overlayfs's rename) through the kernel, tmpfs the
/// reference: the file moves and a character device 0/0 takes its old
/// name, over an existing target too; with RENAME_EXCHANGE it is EINVAL.
#[test]
fn rename_whiteout_as_on_tmpfs() {
    let m = Mounted::new("");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let outcome = |root: &Path| {
        let at = |name: &str| root.join(name);
        fs::write(at("a"), b"moved").unwrap();
        fs::write(at("c"), b"also").unwrap();
        fs::write(at("d"), b"replaced").unwrap();
        let results = (
            errno_of(rename2(&at("a"), &at("b"), libc::RENAME_WHITEOUT)),
            errno_of(rename2(&at("c"), &at("d"), libc::RENAME_WHITEOUT)),
            errno_of(rename2(
                &at("b"),
                &at("d"),
                libc::RENAME_WHITEOUT | libc::RENAME_EXCHANGE,
            )),
        );
        let contents = (fs::read(at("b")).unwrap(), fs::read(at("d")).unwrap());
        (results, contents, listing(root))
    };
    let theirs = outcome(tmp.path());
    assert_eq!(theirs.0, (Ok(()), Ok(()), Err(libc::EINVAL)), "tmpfs");
    assert!(
        theirs
            .2
            .iter()
            .any(|l| l.starts_with("c \"a\"") && l.contains("rdev=0")),
        "{:?}",
        theirs.2
    );
    let ours = outcome(&m.mnt);
    assert_eq!((ours.0, ours.1), (theirs.0, theirs.1));
    // (Times differ; type, mode, links and device numbers do not.)
    let strip = |l: &Vec<String>| -> Vec<String> {
        l.iter()
            .map(|s| s.split(" owner=").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(strip(&ours.2), strip(&theirs.2));
}

/// A file handle of `path` (name_to_handle_at): `struct file_handle` in a
/// buffer of u32s (its alignment), 128 bytes of handle at most.
fn handle_of(path: &Path) -> std::io::Result<Vec<u32>> {
    let mut buf = vec![0u32; 2 + 32];
    buf[0] = 128; // handle_bytes
    let mut mount_id: libc::c_int = 0;
    // SAFETY: a valid C string and a buffer laid out as struct file_handle
    // with room for the 128 bytes it says.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c_path(path).as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mount_id,
            0,
        )
    };
    match r {
        0 => Ok(buf),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Open the file `handle` names, on the filesystem mounted at `mnt`.
fn open_handle(mnt: &Path, handle: &mut [u32], flags: i32) -> std::io::Result<File> {
    let dir = File::open(mnt)?;
    // SAFETY: an open directory and a struct file_handle made by
    // name_to_handle_at.
    let fd = unsafe {
        libc::open_by_handle_at(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            handle.as_mut_ptr().cast(),
            flags,
        )
    };
    match fd {
        // SAFETY: a descriptor just opened, owned by nobody else.
        fd if fd >= 0 => Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Evict unused dentries and inodes from every kernel cache (root only).
/// Twice: the first pass only takes the "recently used" mark off what was
/// just used (the LRU's second chance), the second evicts it.
fn drop_kernel_caches() {
    for _ in 0..2 {
        fs::write("/proc/sys/vm/drop_caches", "2").expect("write /proc/sys/vm/drop_caches as root");
    }
}

/// File handles through the kernel, tmpfs the reference: a handle of a
/// file and of a directory opens them again after the kernel has dropped
/// them from its caches (the daemon answers the lookups of "." and ".."
/// by number), and a handle of a file that is gone is ESTALE, also when
/// its inode number has been given to a new file.
#[test]
fn file_handles_outlive_the_kernel_cache_as_on_tmpfs() {
    let m = Mounted::new("");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let outcome = |root: &Path| {
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"by handle").unwrap();
        let mut file = handle_of(&root.join("d/f")).unwrap();
        let mut dir = handle_of(&root.join("d")).unwrap();
        drop_kernel_caches();
        let mut read = String::new();
        open_handle(root, &mut file, libc::O_RDONLY)
            .unwrap()
            .read_to_string(&mut read)
            .unwrap();
        let d = open_handle(root, &mut dir, libc::O_RDONLY | libc::O_DIRECTORY).unwrap();
        let dir_ok = d.metadata().unwrap().is_dir();
        fs::remove_file(root.join("d/f")).unwrap();
        fs::write(root.join("d/g"), b"a new file").unwrap();
        drop_kernel_caches();
        let gone = errno_of(open_handle(root, &mut file, libc::O_RDONLY));
        (read, dir_ok, gone)
    };
    let theirs = outcome(tmp.path());
    assert_eq!(
        theirs,
        ("by handle".to_string(), true, Err(libc::ESTALE)),
        "tmpfs"
    );
    assert_eq!(outcome(&m.mnt), theirs);
}

/// POSIX ACLs through the kernel, tmpfs the reference: setfacl and getfacl
/// work; an ACL entry lets nobody write where the mode alone would not;
/// a default ACL is inherited by new files (cut to their mode, no umask)
/// and new directories (as their default too); chmod moves the mask; an
/// ACL removed leaves the mode.
#[test]
fn posix_acls_as_on_tmpfs() {
    let m = Mounted::new("allow_other");
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let outcome = |root: &Path| {
        let sh = |script: &str| {
            let out = Command::new("sh")
                .args(["-c", script])
                .current_dir(root)
                .output()
                .unwrap();
            format!(
                "{}{}{}",
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).replace(&root.display().to_string(), "ROOT")
            )
        };
        let nobody = |script: &str| {
            as_nobody("sh")
                .args(["-c", script])
                .current_dir(root)
                .status()
                .unwrap()
                .success()
        };
        let mut seen = Vec::new();
        seen.push(sh(
            "mkdir d && chmod 755 d && setfacl -m u:nobody:rwx d && \
                      setfacl -d -m u:nobody:rw,g::r,o::- d && getfacl --omit-header d",
        ));
        seen.push(sh(
            "umask 022; echo x > d/f; mkdir d/sub; stat -c %a d/f d/sub; \
                      getfacl --omit-header d/f d/sub",
        ));
        let nobody_writes = nobody("echo y >> d/f");
        seen.push(sh("echo z > plain; chmod 644 plain; stat -c %a plain"));
        let nobody_plain = nobody("echo y >> plain");
        seen.push(sh(
            "chmod 600 d/f && getfacl --omit-header d/f; stat -c %a d/f",
        ));
        let nobody_after_chmod = nobody("echo w >> d/f");
        seen.push(sh(
            "setfacl -b d/f && getfacl --omit-header d/f; stat -c %a d/f; \
                      setfacl -m u:nobody:rw plain && stat -c %a plain",
        ));
        (seen, nobody_writes, nobody_plain, nobody_after_chmod)
    };
    let theirs = outcome(tmp.path());
    assert_eq!(
        (theirs.1, theirs.2, theirs.3),
        (true, false, false),
        "tmpfs: {:#?}",
        theirs.0
    );
    let ours = outcome(&m.mnt);
    for (a, b) in ours.0.iter().zip(&theirs.0) {
        assert_eq!(a, b, "daxfs, then tmpfs");
    }
    assert_eq!((ours.1, ours.2, ours.3), (theirs.1, theirs.2, theirs.3));
}

/// Through the kernel: one file takes 1,000 attributes and a 64 KiB value
/// (ext4 with large xattrs and XFS hold as much; daxfs held one block), and
/// lists and reads them back after a remount.
#[test]
fn many_and_large_xattrs_through_the_kernel() {
    let mut m = Mounted::new("");
    let f = m.path("f");
    fs::write(&f, b"x").unwrap();
    let c = c_path(&f);
    let set = |name: &str, value: &[u8]| {
        let name = CString::new(name).unwrap();
        // SAFETY: valid C strings and a value of the given length.
        let r = unsafe {
            libc::setxattr(
                c.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "{:?}: {}", name, std::io::Error::last_os_error());
    };
    for i in 0..1000 {
        set(
            &format!("user.attribute-{i:04}"),
            format!("value {i}").as_bytes(),
        );
    }
    let big: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    set("user.big", &big);
    let (img, mnt) = (m.img.clone(), m.mnt.clone());
    let out = m.umount();
    assert!(out.status.success(), "{}", text(&out));
    let again = Mounted::over(&img, &mnt, "");
    let c = c_path(&again.path("f"));
    let mut list = vec![0u8; 64 << 10];
    // SAFETY: a valid C string and a buffer of the given length.
    let n = unsafe { libc::listxattr(c.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(n > 0, "{}", std::io::Error::last_os_error());
    assert_eq!(
        list[..n as usize]
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .count(),
        1001
    );
    let mut back = vec![0u8; 65536];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"user.big".as_ptr(),
            back.as_mut_ptr().cast(),
            back.len(),
        )
    };
    assert_eq!(n, 65536, "{}", std::io::Error::last_os_error());
    assert!(back == big);
    drop(again);
    fsck_clean(&img);
}

/// The filesystem type `dir` lives on, as statfs says.
fn on_tmpfs(dir: &Path) -> bool {
    let c = c_path(dir);
    // SAFETY: an all-zero statfs is a valid value; statfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs to fill.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    st.f_type == 0x0102_1994
}

/// `daxfs mount` with no arguments, as the README's first command runs it:
/// the image is made in memory (here `DAXFS_IMAGES`, a directory on the
/// tmpfs), not in the current directory; the first line says where it is
/// and that it does not survive a reboot; the files are there at the next
/// mount, and `fsck` and `info` with no arguments find the same image.
#[test]
fn the_default_mount_is_in_memory_and_its_first_line_says_so() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (cwd, images) = (dir.path().join("cwd"), dir.path().join("images"));
    fs::create_dir(&cwd).unwrap();
    let daxfs_here = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_daxfs"))
            .args(args)
            .current_dir(&cwd)
            .env("DAXFS_IMAGES", &images)
            .output()
            .unwrap()
    };
    let img = images.join("pmem0.img");
    // The guard: unmounts whatever happens below.
    let mut m = Mounted {
        _dir: tempfile::tempdir_in("/dev/shm").unwrap(),
        img: img.clone(),
        mnt: cwd.join("mnt"),
        pid: None,
        said: String::new(),
    };
    for round in 0..2 {
        let out = daxfs_here(&["mount"]);
        assert!(out.status.success(), "{}", text(&out));
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        m.pid = common::daemon_pid(&said);
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "daxfs: {} is on tmpfs (memory): survives the daemon and process crashes, not \
                 a reboot; for one that survives reboots, name an image on a disk (daxfs mount \
                 --help)",
                img.display()
            )
        );
        let created = format!("daxfs: created {} (1 GiB, sparse)", img.display());
        assert_eq!(lines[1].starts_with(&created), round == 0, "{said}");
        assert!(said.contains("at mnt (daemon pid"), "{said}");
        assert!(is_mounted(&m.mnt));
        if round == 0 {
            fs::write(m.path("kept"), b"in memory").unwrap();
        } else {
            assert_eq!(fs::read(m.path("kept")).unwrap(), b"in memory");
        }
        let out = m.umount();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert!(
        !cwd.join("pmem0.img").exists(),
        "an image in the current directory"
    );
    assert_eq!(fs::metadata(&img).unwrap().len(), 1 << 30);
    let out = daxfs_here(&["fsck"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: clean", img.display())
    );
    let out = daxfs_here(&["info"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&img.display().to_string()),
        "{}",
        text(&out)
    );
}

/// An image on a disk filesystem says that it survives reboots and that
/// writes wait for the disk; with `-o fast` that a machine crash can lose
/// recent writes. (Where the build directory is a tmpfs, its line must say
/// memory.)
#[test]
fn an_image_on_disk_says_what_it_survives() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut m = Mounted::new_in(root, "");
    let first = m.said.lines().next().unwrap().to_string();
    let img = m.img.display().to_string();
    let expected = match on_tmpfs(root) {
        true => "(memory): survives the daemon and process crashes, not a reboot",
        false => "(disk): survives reboots; writes wait for the disk; for memory speed",
    };
    assert!(
        first.starts_with(&format!("daxfs: {img} is on ")) && first.contains(expected),
        "{first}"
    );
    fs::write(m.path("f"), b"x").unwrap();
    assert!(m.umount().status.success());
    m.mount("fast");
    let first = m.said.lines().next().unwrap().to_string();
    let expected = match on_tmpfs(root) {
        true => "(memory)",
        false => {
            "(disk, fast mode): survives the daemon and process crashes; a machine \
                  crash can lose recent writes"
        }
    };
    assert!(first.contains(expected), "{first}");
    assert_eq!(fs::read(m.path("f")).unwrap(), b"x");
}

/// A control client that goes before its answer is written must not take
/// the daemon with it (a plain write to a closed socket raises SIGPIPE,
/// whose default kills, and the command restores the default; the
/// daemon's sockets are written with MSG_NOSIGNAL, as std does). The
/// daemon is stopped while the clients send their requests and close, so
/// the answers are written to closed sockets every time.
#[test]
fn a_control_client_that_leaves_before_its_answer_does_not_kill_the_daemon() {
    let m = Mounted::new("");
    let socket = control_socket(&m);
    let pid = m.pid.unwrap();
    struct Continue(i32);
    impl Drop for Continue {
        fn drop(&mut self) {
            // SAFETY: signalling the daemon this test started.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    // SAFETY: signalling the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let resume = Continue(pid);
    for op in ["stat", "list"] {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        writeln!(s, "{{\"op\":\"{op}\"}}").unwrap();
    }
    drop(resume);
    // Answered once its earlier answers have been written (and failed).
    let out = daxfs(&["stat".as_ref(), m.mnt.as_os_str()]);
    assert!(out.status.success(), "the daemon died: {}", text(&out));
    fs::write(m.path("still"), b"served").unwrap();
    assert_eq!(fs::read(m.path("still")).unwrap(), b"served");
}

/// A tmpfs of `size` mounted in a temporary directory; unmounted (lazily
/// if busy) when dropped.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn new(size: &str) -> SmallTmpfs {
        let dir = tempfile::Builder::new()
            .prefix("daxfs-small")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", text(&out));
        SmallTmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let c = c_path(self.dir.path());
        // SAFETY: a valid C string; unmounting has no other effect here.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            // SAFETY: as above.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// An image bigger than the filesystem that holds it (sparse, as every
/// image starts): when that filesystem fills, writes fail with ENOSPC and
/// the daemon lives on (a store into a page the tmpfs cannot give raised
/// SIGBUS and killed it); what was written stays, fsck is clean. A format
/// that cannot fit its metadata says so instead of dying.
#[test]
fn an_image_whose_filesystem_fills_up_gives_enospc_not_a_dead_daemon() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let small = SmallTmpfs::new("48M");
    let img = small.path().join("pmem0.img");
    let mkfs = |img: &Path| {
        daxfs(&[
            "mkfs".as_ref(),
            img.as_os_str(),
            "--size".as_ref(),
            "256M".as_ref(),
        ])
    };
    let out = mkfs(&img);
    assert!(out.status.success(), "{}", text(&out));
    let mut m = Mounted::over(&img, &small.path().join("mnt"), "");
    fs::write(m.path("kept"), vec![7u8; 1 << 20]).unwrap();
    let mut f = File::create(m.path("big")).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match f.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
        assert!(written < 256 << 20, "wrote more than the image holds");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written > 8 << 20 && written < 48 << 20, "{written}");
    drop(f);
    let out = daxfs(&["stat".as_ref(), m.mnt.as_os_str()]);
    assert!(out.status.success(), "the daemon died: {}", text(&out));
    assert_eq!(fs::read(m.path("kept")).unwrap(), vec![7u8; 1 << 20]);
    assert_eq!(fs::metadata(m.path("big")).unwrap().len(), written);
    // Space comes back with the file.
    fs::remove_file(m.path("big")).unwrap();
    fs::write(m.path("again"), vec![3u8; 4 << 20]).unwrap();
    assert!(m.umount().status.success());
    fsck_clean(&img);

    // A device whose metadata does not fit: an error, no crash.
    let tiny = SmallTmpfs::new("4M");
    let out = mkfs(&tiny.path().join("pmem0.img"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the filesystem holding the device is full"),
        "{err}"
    );
}
