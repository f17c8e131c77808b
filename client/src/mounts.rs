//! The mount table: the `fuse.daxfs` mounts of this mount namespace, read
//! from /proc/self/mountinfo (`ID PARENT DEV ROOT MOUNTPOINT OPTIONS
//! [TAGS] - TYPE SOURCE SUPER-OPTIONS`), in one place for every question
//! the command asks of it: where an image is mounted, which image a mount
//! point shows, and who mounted it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One `fuse.daxfs` mount.
pub struct DaxfsMount {
    /// The mount point.
    pub at: PathBuf,
    /// The image (the mount's source).
    pub image: PathBuf,
    /// The user who mounted it (`user_id=`).
    pub owner: Option<u32>,
    /// The device number of its files (`st_dev`).
    pub dev: u64,
}

/// Every `fuse.daxfs` mount now.
pub fn daxfs_mounts() -> Vec<DaxfsMount> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mut fields = mount.split(' ');
            let (major, minor) = fields.nth(2)?.split_once(':')?;
            let dev = libc::makedev(major.parse().ok()?, minor.parse().ok()?);
            let at = fields.nth(1)?;
            let mut fs = fs.split(' ');
            let (fstype, source, options) = (fs.next()?, fs.next()?, fs.next()?);
            (fstype == "fuse.daxfs").then(|| DaxfsMount {
                at: unescape(at),
                image: unescape(source),
                owner: options
                    .split(',')
                    .find_map(|o| o.strip_prefix("user_id=")?.parse().ok()),
                dev,
            })
        })
        .collect()
}

/// The daxfs mount whose files have device number `dev` (`st_dev`).
pub fn with_dev(dev: u64) -> Option<DaxfsMount> {
    daxfs_mounts().into_iter().find(|m| m.dev == dev)
}

/// The mount of the mount point `at`, if it is a daxfs mount point.
fn mount_at(at: &Path) -> Option<DaxfsMount> {
    let at = std::fs::canonicalize(at).ok()?;
    daxfs_mounts().into_iter().find(|m| m.at == at)
}

/// Where `image` is mounted now, if it is.
pub fn mounted_at(image: &Path) -> Option<PathBuf> {
    let image = std::fs::canonicalize(image).ok()?;
    daxfs_mounts()
        .into_iter()
        .find(|m| m.image == image)
        .map(|m| m.at)
}

/// The image of the daxfs mount at `mountpoint`.
pub fn image_of(mountpoint: &Path) -> Option<PathBuf> {
    mount_at(mountpoint).map(|m| m.image)
}

/// The owner (the user who mounted it) of the daxfs mount at `mountpoint`.
pub fn owner_of(mountpoint: &Path) -> Option<u32> {
    mount_at(mountpoint)?.owner
}

/// The mount table escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> PathBuf {
    let (bytes, mut out) = (field.as_bytes(), Vec::with_capacity(field.len()));
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .and_then(|c| std::str::from_utf8(c).ok());
        match code
            .filter(|_| bytes[i] == b'\\')
            .map(|c| u8::from_str_radix(c, 8))
        {
            Some(Ok(b)) => {
                out.push(b);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_fields_are_read_back_byte_for_byte() {
        assert_eq!(unescape("/mnt/a\\040b"), PathBuf::from("/mnt/a b"));
        assert_eq!(unescape("/x\\134y\\011z"), PathBuf::from("/x\\y\tz"));
        assert_eq!(unescape("/bad\\9"), PathBuf::from("/bad\\9"));
        let raw = unescape("/n\\303\\251");
        assert_eq!(raw.as_os_str().as_encoded_bytes(), "/né".as_bytes());
    }
}
