//! What the integration tests of the mount share: the `daxfs` command, and
//! a mounted image in a temporary directory that is unmounted when its
//! guard drops, also when a test fails (lazily, and the daemon killed, if a
//! clean unmount is refused).

#![allow(dead_code)] // (each test file uses its own part)

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn daxfs(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_daxfs"))
        .args(args)
        .output()
        .expect("run daxfs")
}

pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn is_mounted(at: &Path) -> bool {
    let at = at.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(at.as_str()))
}

/// The daemon's pid, from what `daxfs mount` wrote ("... (daemon pid N)").
pub fn daemon_pid(said: &str) -> Option<i32> {
    said.split("daemon pid ")
        .nth(1)
        .and_then(|s| s.trim().trim_end_matches(')').parse().ok())
}

/// A mounted image; unmounts (whatever happens) when dropped.
pub struct Mounted {
    pub _dir: tempfile::TempDir,
    pub img: PathBuf,
    pub mnt: PathBuf,
    pub pid: Option<i32>,
    /// What the last `mount` wrote on its standard output.
    pub said: String,
}

impl Mounted {
    pub fn new(options: &str) -> Mounted {
        Mounted::new_in(Path::new("/dev/shm"), options)
    }

    /// A mount of an image made in a temporary directory under `root`.
    pub fn new_in(root: &Path, options: &str) -> Mounted {
        let dir = tempfile::Builder::new()
            .prefix("daxfs-mount")
            .tempdir_in(root)
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let img = dir.path().join("pmem0.img");
        let mnt = dir.path().join("mnt");
        let mut m = Mounted {
            _dir: dir,
            img,
            mnt,
            pid: None,
            said: String::new(),
        };
        m.mount(options);
        m
    }

    /// A mount of the existing image `img` at `mnt` (over a dead mount
    /// there too); both are kept when it drops.
    pub fn over(img: &Path, mnt: &Path, options: &str) -> Mounted {
        let mut m = Mounted {
            _dir: tempfile::tempdir_in("/dev/shm").unwrap(),
            img: img.to_path_buf(),
            mnt: mnt.to_path_buf(),
            pid: None,
            said: String::new(),
        };
        m.mount(options);
        m
    }

    pub fn mount(&mut self, options: &str) {
        let mut args = vec!["mount".as_ref(), self.img.as_os_str(), self.mnt.as_os_str()];
        if !options.is_empty() {
            args.push(std::ffi::OsStr::new("-o"));
            args.push(std::ffi::OsStr::new(options));
        }
        let out = daxfs(&args);
        assert!(out.status.success(), "mount: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        self.pid = daemon_pid(&stdout);
        assert!(self.pid.is_some(), "{stdout}");
        assert!(is_mounted(&self.mnt), "mounted once mount returned");
        self.said = stdout;
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.mnt.join(p)
    }

    pub fn umount(&mut self) -> Output {
        let out = daxfs(&["umount".as_ref(), self.mnt.as_os_str()]);
        if out.status.success() {
            self.pid = None;
        }
        out
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let out = self.umount();
            if !out.status.success() {
                let c = CString::new(self.mnt.as_os_str().as_bytes()).unwrap();
                // SAFETY: a valid C string; a lazy unmount has no other effect
                // on this process.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Some(pid) = self.pid {
            // The daemon exits once unmounted; if not soon, kill it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: signalling a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
