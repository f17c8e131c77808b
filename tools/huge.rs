//! `daxfs create --huge`: put an emulated device on memory the kernel maps
//! with 2 MiB pages.
//!
//! If the image's own directory is already huge-page capable (a tmpfs mounted
//! `huge=always`, `within_size` or `advise`, or hugetlbfs), the image is simply
//! created there. Otherwise, as root, we mount (once) a tmpfs with
//! `huge=always` at [`HUGE_DIR`], create the image in it, and leave a symbolic
//! link at the requested path. Anything else is explained, and the image is
//! created where it was asked for, without huge pages.

use std::path::{Path, PathBuf};

/// Where `--huge` mounts its tmpfs when it has to.
pub const HUGE_DIR: &str = "/run/daxfs/huge";

/// Where to create the image for `--huge`.
pub enum Placement {
    /// Create at the requested path (its filesystem is huge-page capable).
    InPlace,
    /// Create at this path and link the requested path to it.
    Linked(PathBuf),
    /// No huge pages to be had: create in place, and tell the user why.
    Refused(String),
}

/// Decide where an image asked for at `image` should live.
pub fn place(image: &Path) -> Placement {
    let dir = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if pmem::huge_pages_at(&dir).is_ok_and(|huge| huge.capable) {
        return Placement::InPlace;
    }
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
    match shmem {
        Err(_) => {
            return Placement::Refused(
                "this kernel has no transparent huge pages for tmpfs".to_string(),
            )
        }
        Ok(text) if text.contains("[deny]") => {
            return Placement::Refused(
                "shmem_enabled is [deny]: huge pages are off for every tmpfs".to_string(),
            )
        }
        Ok(_) => {}
    }
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Placement::Refused(format!(
            "{} is not on a huge-page tmpfs, and mounting one needs root \
             (mount -t tmpfs -o huge=always none DIR, then create the image in DIR)",
            dir.display()
        ));
    }
    match mount_huge_tmpfs() {
        Ok(huge_dir) => {
            let name = image.file_name().unwrap_or(image.as_os_str());
            Placement::Linked(huge_dir.join(name))
        }
        Err(why) => Placement::Refused(why),
    }
}

/// Mount a `huge=always` tmpfs at [`HUGE_DIR`] unless one is there already.
fn mount_huge_tmpfs() -> Result<PathBuf, String> {
    let dir = PathBuf::from(HUGE_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {HUGE_DIR}: {e}"))?;
    if pmem::huge_pages_at(&dir).is_ok_and(|huge| huge.capable) {
        return Ok(dir);
    }
    let status = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "huge=always,mode=0755",
            "daxfs-huge",
            HUGE_DIR,
        ])
        .status()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !status.success() {
        return Err(format!(
            "mount -t tmpfs -o huge=always at {HUGE_DIR} failed ({status})"
        ));
    }
    Ok(dir)
}
