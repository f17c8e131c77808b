//! Where `daxfs mount` keeps its image when none is named.
//!
//! An emulated pmem device stands in for memory (Linux's own emulation,
//! `memmap=`, is RAM that a reboot clears), and people who reach for it
//! expect memory speed. So the default image lives in memory: in a
//! directory private to the user on the tmpfs at `/dev/shm`
//! (`/dev/shm/daxfs-USER/pmem0.img`), where making a store durable costs a
//! cache flush. It survives the daemon and every process crashing, not a
//! reboot. An image named on a disk filesystem survives reboots, and every
//! persist then also waits for `msync`: many times slower, which is what
//! the mount's first line says.
//!
//! `DAXFS_IMAGES=DIR` puts default images in `DIR` instead. An image made
//! by an earlier version in the current directory (`./pmem0.img`) is still
//! the default there, so that nobody's files seem lost. A machine without
//! a tmpfs at `/dev/shm`, or with less than 16 MiB free on it, gets
//! `./pmem0.img`, and is told why.

use crate::socket::check_private;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The default image's file name.
pub const IMAGE_NAME: &str = "pmem0.img";

/// The size a default image is made with, when memory allows.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// The smallest device daxfs makes.
pub const MIN_SIZE: u64 = 16 << 20;

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Where the default image is, and the size to make it with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultImage {
    /// The image.
    pub path: PathBuf,
    /// The size to make it with when missing: 1 GiB, or what fits in the
    /// free memory of its tmpfs.
    pub size: u64,
    /// Why it is not where it usually is, or smaller: a sentence.
    pub note: Option<String>,
}

/// The default image of the user running this (see the module's docs).
/// Makes the per-user directory when missing; errors when that directory
/// is not private to the user (someone else made it first), naming it.
pub fn default_image() -> Result<DefaultImage, String> {
    let earlier = PathBuf::from(IMAGE_NAME);
    if earlier.is_file() {
        return Ok(DefaultImage {
            size: DEFAULT_SIZE,
            path: earlier,
            note: Some(format!(
                "./{IMAGE_NAME} (made by an earlier daxfs) is the default image in this \
                 directory"
            )),
        });
    }
    if let Some(dir) = std::env::var_os("DAXFS_IMAGES") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let free = free_bytes(&dir)?;
        let size = size_for(free).ok_or_else(|| {
            format!(
                "{} (DAXFS_IMAGES) has only {} MiB free; a device needs 16 MiB",
                dir.display(),
                free >> 20
            )
        })?;
        return Ok(in_dir(&dir, size));
    }
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    in_memory(Path::new("/dev/shm"), &name, uid.as_raw())
}

/// The default image under `base` (a tmpfs), in `base/daxfs-NAME`; or
/// `./pmem0.img` with a note when `base` cannot hold it.
pub fn in_memory(base: &Path, name: &str, uid: u32) -> Result<DefaultImage, String> {
    let on_disk = |why: String| DefaultImage {
        path: PathBuf::from(IMAGE_NAME),
        size: DEFAULT_SIZE,
        note: Some(format!(
            "{why}: the image is ./{IMAGE_NAME}, on the disk of the current directory"
        )),
    };
    match fs_magic(base) {
        Ok(TMPFS_MAGIC) => {}
        Ok(_) => return Ok(on_disk(format!("{} is not a tmpfs", base.display()))),
        Err(e) => return Ok(on_disk(e)),
    }
    let dir = base.join(format!("daxfs-{name}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: cannot make it: {e}", dir.display())),
    }
    // /dev/shm is everyone's: a directory someone else made first (or a
    // symlink to one) could hand them our image.
    check_private(&dir, uid)
        .map_err(|e| format!("{e} (the default image's directory must be yours alone)"))?;
    if dir.join(IMAGE_NAME).exists() {
        return Ok(in_dir(&dir, DEFAULT_SIZE));
    }
    let free = free_bytes(&dir)?;
    match size_for(free) {
        Some(size) => Ok(in_dir(&dir, size)),
        None => Ok(on_disk(format!(
            "{} has only {} MiB free",
            base.display(),
            free >> 20
        ))),
    }
}

fn in_dir(dir: &Path, size: u64) -> DefaultImage {
    DefaultImage {
        path: dir.join(IMAGE_NAME),
        size,
        note: (size < DEFAULT_SIZE).then(|| {
            format!(
                "{} has {} MiB free: the image is made with {} MiB, not 1 GiB",
                dir.display(),
                size >> 20,
                size >> 20
            )
        }),
    }
}

/// The size of a new default image where `free` bytes are free: 1 GiB,
/// or all the free space in whole 2 MiB when that is less (a store into a
/// sparse image on a full tmpfs would kill the daemon with SIGBUS); none
/// below 16 MiB.
pub fn size_for(free: u64) -> Option<u64> {
    let size = DEFAULT_SIZE.min(free & !((2 << 20) - 1));
    (size >= MIN_SIZE).then_some(size)
}

fn statfs(dir: &Path) -> Result<nix::sys::statfs::Statfs, String> {
    nix::sys::statfs::statfs(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn fs_magic(dir: &Path) -> Result<i64, String> {
    statfs(dir).map(|s| s.filesystem_type().0)
}

fn free_bytes(dir: &Path) -> Result<u64, String> {
    statfs(dir).map(|s| s.blocks_available() * s.block_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn shm_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("daxfs-images-")
            .tempdir_in("/dev/shm")
            .unwrap()
    }

    #[test]
    fn the_default_image_is_in_a_private_directory_on_the_tmpfs() {
        let base = shm_dir();
        let uid = nix::unistd::getuid().as_raw();
        let image = in_memory(base.path(), "someone", uid).unwrap();
        let dir = base.path().join("daxfs-someone");
        assert_eq!(image.path, dir.join(IMAGE_NAME));
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        // Made again: the same place.
        assert_eq!(in_memory(base.path(), "someone", uid).unwrap(), image);
    }

    /// Someone else's directory (or one open to others, or a symlink)
    /// where ours would be is refused, named, and never used.
    #[test]
    fn a_squatted_directory_is_refused() {
        let base = shm_dir();
        let uid = nix::unistd::getuid().as_raw();
        let open = base.path().join("daxfs-open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = in_memory(base.path(), "open", uid).unwrap_err();
        assert!(e.contains("daxfs-open") && e.contains("0700"), "{e}");
        let target = base.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, base.path().join("daxfs-link")).unwrap();
        let e = in_memory(base.path(), "link", uid).unwrap_err();
        assert!(
            e.contains("daxfs-link") && e.contains("not a directory"),
            "{e}"
        );
        let e = in_memory(base.path(), "mine", uid + 1).unwrap_err();
        assert!(e.contains("belongs to uid"), "{e}");
    }

    /// Where there is no tmpfs the image is on disk, and the note says why.
    #[test]
    fn without_a_tmpfs_the_image_is_on_disk_and_the_note_says_why() {
        let disk = Path::new(env!("CARGO_MANIFEST_DIR"));
        if fs_magic(disk) == Ok(TMPFS_MAGIC) {
            eprintln!("skipped: the source tree is on a tmpfs");
            return;
        }
        let image = in_memory(disk, "x", 0).unwrap();
        assert_eq!(image.path, PathBuf::from(IMAGE_NAME));
        let note = image.note.unwrap();
        assert!(note.contains("is not a tmpfs"), "{note}");
        assert!(!disk.join("daxfs-x").exists());
    }

    #[test]
    fn a_new_image_fits_in_the_free_space() {
        assert_eq!(size_for(64 << 30), Some(DEFAULT_SIZE));
        assert_eq!(size_for(DEFAULT_SIZE), Some(DEFAULT_SIZE));
        assert_eq!(size_for((100 << 20) + 4096), Some(100 << 20));
        assert_eq!(size_for((101 << 20) + 4096), Some(100 << 20));
        assert_eq!(size_for(16 << 20), Some(16 << 20));
        assert_eq!(size_for((16 << 20) - 1), None);
    }
}
