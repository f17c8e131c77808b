//! What lies under a device: an emulated image on some filesystem, or a
//! `/dev/daxX.Y` character device. From that follow the persistence mode, the
//! huge-page capability, and the granule (the smallest piece the mapping can be
//! split into).

use crate::error::{Error, Result};
use crate::mapping::{MapMode, HUGE_PAGE};
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// What the device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A regular file standing in for a pmem namespace.
    Emulated,
    /// A device-dax character device (`/dev/daxX.Y`), named as in sysfs.
    DevDax {
        /// The device's name, such as `dax0.0`.
        name: String,
    },
}

/// How stores become durable on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistenceMode {
    /// The kernel accepted `MAP_SYNC` (or the device is device-dax): CPU cache
    /// flushes and a fence make stores durable.
    Dax,
    /// tmpfs or hugetlbfs: CPU flush and fence is the model; nothing survives a
    /// reboot anyway.
    Memory,
    /// The page cache of a disk filesystem: `persist` also calls `msync`.
    Msync,
    /// Disk-backed, but opened in fast mode: no `msync`, so a machine crash can
    /// lose writes that `persist` returned from.
    Fast,
}

impl fmt::Display for PersistenceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PersistenceMode::Dax => "dax",
            PersistenceMode::Memory => "memory",
            PersistenceMode::Msync => "msync",
            PersistenceMode::Fast => "fast",
        })
    }
}

impl PersistenceMode {
    /// What holds the data, in a word or two: memory, disk, or pmem.
    pub fn medium(self) -> &'static str {
        match self {
            PersistenceMode::Dax => "pmem, DAX",
            PersistenceMode::Memory => "memory",
            PersistenceMode::Msync => "disk",
            PersistenceMode::Fast => "disk, fast mode",
        }
    }

    /// What durable data survives, and what writes cost, for a user.
    pub fn survives(self) -> &'static str {
        match self {
            PersistenceMode::Dax => {
                "survives reboots and power loss; stores are durable once flushed"
            }
            PersistenceMode::Memory => "survives the daemon and process crashes, not a reboot",
            PersistenceMode::Msync => "survives reboots; writes wait for the disk",
            PersistenceMode::Fast => {
                "survives the daemon and process crashes; a machine crash can lose recent writes"
            }
        }
    }
}

/// The persistence mode and the reason it was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Persistence {
    /// The mode.
    pub mode: PersistenceMode,
    /// Why, in a sentence a user can act on.
    pub reason: String,
}

/// Whether the kernel can map the device with 2 MiB pages, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugePages {
    /// True when 2 MiB mappings are possible.
    pub capable: bool,
    /// Why, in a sentence.
    pub reason: String,
}

/// The facts about a device file, found before it is mapped.
#[derive(Debug)]
pub(crate) struct Backing {
    pub(crate) kind: DeviceKind,
    pub(crate) size: u64,
    /// The device's mapping alignment (2 MiB unless a /dev/dax says otherwise).
    pub(crate) align: u64,
    /// The smallest piece of the mapping that can be replaced on its own.
    pub(crate) granule: u64,
    pub(crate) fs_name: String,
    fs_magic: i64,
    pub(crate) huge_pages: HugePages,
    /// The kernel's badblocks of a /dev/dax: the region's file, and the device's
    /// start within the region in sectors.
    pub(crate) kernel_badblocks: Option<(PathBuf, u64)>,
}

impl Backing {
    pub(crate) fn probe(file: &File, path: &Path) -> Result<Backing> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io(path, "read the file's metadata", e))?;
        let (fs_magic, fs_block) = statfs(file, path)?;
        let fs_name = fs_type_name(fs_magic);
        if meta.file_type().is_char_device() {
            let (maj, min) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
            let sysfs = PathBuf::from(format!("/sys/dev/char/{maj}:{min}"));
            return DaxSysfs::read(&sysfs, path).map(|dax| dax.into_backing(fs_name, fs_magic));
        }
        if !meta.file_type().is_file() {
            return Err(Error::NotADevice {
                path: path.to_path_buf(),
                reason:
                    "neither a regular file (an emulated device) nor a /dev/dax character device"
                        .to_string(),
            });
        }
        let page = page_size();
        let granule = if fs_magic == HUGETLBFS_MAGIC {
            fs_block.max(page)
        } else {
            page
        };
        let huge_pages = emulated_huge_pages(&meta, fs_magic, &fs_name);
        Ok(Backing {
            kind: DeviceKind::Emulated,
            size: meta.len(),
            align: HUGE_PAGE,
            granule,
            fs_name,
            fs_magic,
            huge_pages,
            kernel_badblocks: None,
        })
    }

    pub(crate) fn is_memory(&self) -> bool {
        self.fs_magic == TMPFS_MAGIC || self.fs_magic == HUGETLBFS_MAGIC
    }

    pub(crate) fn persistence(&self, mode: MapMode, fast: bool) -> Persistence {
        let fs = &self.fs_name;
        let (mode, reason) = match (&self.kind, mode) {
            (DeviceKind::DevDax { name }, _) => (
                PersistenceMode::Dax,
                format!("{name} is a device-dax character device: CPU cache flushes are enough"),
            ),
            (_, MapMode::Sync) => (
                PersistenceMode::Dax,
                format!("{fs} accepted MAP_SYNC: the mapping is DAX, CPU cache flushes are enough"),
            ),
            _ if self.is_memory() => (
                PersistenceMode::Memory,
                format!(
                    "{fs} is memory-backed: CPU flush and fence is the persistence model, \
                     and nothing survives a reboot"
                ),
            ),
            _ if fast => (
                PersistenceMode::Fast,
                format!(
                    "{fs} is disk-backed (MAP_SYNC refused) and the device was opened in fast \
                     mode: persist skips msync, so a machine crash can lose recent writes"
                ),
            ),
            _ => (
                PersistenceMode::Msync,
                format!(
                    "{fs} is disk-backed (MAP_SYNC refused): persist also calls msync so that \
                     data survives a machine crash"
                ),
            ),
        };
        Persistence { mode, reason }
    }
}

/// Whether files created in `dir` (or beside `dir`, if it is a file) can be
/// mapped with 2 MiB pages, and why.
pub fn huge_pages_at(dir: &Path) -> Result<HugePages> {
    let file = File::open(dir).map_err(|e| Error::io(dir, "open", e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(dir, "read the metadata", e))?;
    let (magic, _) = statfs(&file, dir)?;
    Ok(emulated_huge_pages(&meta, magic, &fs_type_name(magic)))
}

fn statfs(file: &File, path: &Path) -> Result<(i64, u64)> {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the struct we own, for a descriptor we own.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::io(
            path,
            "find the file's filesystem",
            std::io::Error::last_os_error(),
        ));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    Ok((st.f_type as i64, st.f_bsize as u64))
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

fn fs_type_name(magic: i64) -> String {
    match magic {
        TMPFS_MAGIC => "tmpfs",
        HUGETLBFS_MAGIC => "hugetlbfs",
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794C_7630 => "overlayfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x1CD1 => "devpts",
        0x0000_9fa0 => "proc",
        _ => return format!("a filesystem of type {magic:#x}"),
    }
    .to_string()
}

/// Huge-page capability of an emulated device, from its filesystem's options.
fn emulated_huge_pages(meta: &std::fs::Metadata, magic: i64, fs: &str) -> HugePages {
    match magic {
        HUGETLBFS_MAGIC => HugePages {
            capable: true,
            reason: "hugetlbfs: every page is a huge page".to_string(),
        },
        TMPFS_MAGIC => {
            let policy = tmpfs_huge_policy(meta.dev()).unwrap_or_else(|| "never".to_string());
            let forced =
                std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
                    .ok()
                    .and_then(|s| selected_word(&s));
            match (forced.as_deref(), policy.as_str()) {
                (Some("deny"), _) => HugePages {
                    capable: false,
                    reason: "tmpfs, but shmem_enabled=deny turns huge pages off for every tmpfs"
                        .to_string(),
                },
                (Some("force"), _) => HugePages {
                    capable: true,
                    reason: "tmpfs with shmem_enabled=force: huge pages everywhere".to_string(),
                },
                (_, "always" | "within_size" | "advise") => HugePages {
                    capable: true,
                    reason: format!(
                        "tmpfs mounted huge={policy}: the kernel maps it with 2 MiB pages"
                    ),
                },
                _ => HugePages {
                    capable: false,
                    reason: format!(
                        "tmpfs mounted huge={policy}: 4 KiB pages only (mount a tmpfs with \
                         -o huge=always, or use `daxfs create --huge`)"
                    ),
                },
            }
        }
        _ => HugePages {
            capable: false,
            reason: format!(
                "{fs} page cache: 2 MiB mappings are not guaranteed (use a tmpfs mounted \
                 huge=always, or `daxfs create --huge`)"
            ),
        },
    }
}

/// The word in brackets of a sysfs choice list ("always [never] deny").
fn selected_word(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// The `huge=` option of the tmpfs mount whose device number is `dev`.
fn tmpfs_huge_policy(dev: u64) -> Option<String> {
    let id = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo
        .lines()
        .filter(|line| line.split_whitespace().nth(2) == Some(id.as_str()))
        .find_map(|line| {
            let (_, after) = line.split_once(" - ")?;
            let super_opts = after.split_whitespace().nth(2)?;
            Some(
                super_opts
                    .split(',')
                    .find_map(|o| o.strip_prefix("huge="))
                    .unwrap_or("never")
                    .to_string(),
            )
        })
}

/// What sysfs says about a device-dax character device.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DaxSysfs {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) align: u64,
    pub(crate) badblocks: Option<(PathBuf, u64)>,
}

impl DaxSysfs {
    /// Read the sysfs directory of a character device (`/sys/dev/char/M:m`).
    pub(crate) fn read(dir: &Path, dev_path: &Path) -> Result<DaxSysfs> {
        let not_dax = |reason: String| Error::NotADevice {
            path: dev_path.to_path_buf(),
            reason,
        };
        let real = std::fs::canonicalize(dir).map_err(|_| {
            not_dax(format!(
                "a character device with no sysfs entry at {}",
                dir.display()
            ))
        })?;
        let subsystem = std::fs::read_link(real.join("subsystem")).ok();
        if subsystem
            .as_ref()
            .and_then(|s| s.file_name())
            .is_none_or(|n| n != "dax")
        {
            return Err(not_dax(
                "a character device that is not device-dax".to_string(),
            ));
        }
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let read_u64 = |file: &Path| -> Option<u64> {
            let text = std::fs::read_to_string(file).ok()?;
            let text = text.trim();
            match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => text.parse().ok(),
            }
        };
        let size = read_u64(&real.join("size"))
            .ok_or_else(|| not_dax(format!("cannot read {}", real.join("size").display())))?;
        // Kernels before 5.10 have no `align` attribute: device-dax then maps
        // with its namespace's alignment, 2 MiB by default.
        let align = read_u64(&real.join("align")).unwrap_or(HUGE_PAGE);
        // The region (an ancestor directory with a `badblocks` file) reports
        // poison relative to its own start; the device's `resource` says where
        // it starts. Without both, the kernel's list cannot be translated.
        let badblocks = real.ancestors().skip(1).find_map(|dir| {
            let file = dir.join("badblocks");
            if !file.is_file() {
                return None;
            }
            let region_start = read_u64(&dir.join("resource"))?;
            let dev_start = read_u64(&real.join("resource"))?;
            Some((file, dev_start.checked_sub(region_start)? / crate::SECTOR))
        });
        Ok(DaxSysfs {
            name,
            size,
            align,
            badblocks,
        })
    }

    fn into_backing(self, fs_name: String, fs_magic: i64) -> Backing {
        let capable = self.align >= HUGE_PAGE;
        Backing {
            huge_pages: HugePages {
                capable,
                reason: format!(
                    "{} aligned to {} KiB: {}",
                    self.name,
                    self.align / 1024,
                    if capable {
                        "the kernel maps it with 2 MiB pages"
                    } else {
                        "4 KiB pages only"
                    }
                ),
            },
            kind: DeviceKind::DevDax { name: self.name },
            size: self.size,
            align: self.align,
            granule: self.align.max(page_size()),
            fs_name,
            fs_magic,
            kernel_badblocks: self.badblocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_of_a_dax_device_gives_size_alignment_and_badblocks() {
        // A fake sysfs tree shaped like a pmem region with one device-dax.
        let root = tempfile::tempdir().unwrap();
        let region = root.path().join("region0");
        let dax = region.join("dax0.1/dax/dax0.1");
        std::fs::create_dir_all(&dax).unwrap();
        std::fs::create_dir_all(root.path().join("bus/dax")).unwrap();
        std::os::unix::fs::symlink(root.path().join("bus/dax"), dax.join("subsystem")).unwrap();
        std::fs::write(dax.join("size"), "1073741824\n").unwrap();
        std::fs::write(dax.join("align"), "2097152\n").unwrap();
        std::fs::write(dax.join("resource"), "0x240200000\n").unwrap();
        std::fs::write(region.join("resource"), "0x240000000\n").unwrap();
        std::fs::write(region.join("badblocks"), "4104 1\n").unwrap();

        let info = DaxSysfs::read(&dax, Path::new("/dev/dax0.1")).unwrap();
        assert_eq!(info.name, "dax0.1");
        assert_eq!(info.size, 1 << 30);
        assert_eq!(info.align, 2 << 20);
        // The device starts 2 MiB (4096 sectors) into its region.
        assert_eq!(info.badblocks, Some((region.join("badblocks"), 4096)));
    }

    #[test]
    fn a_character_device_that_is_not_dax_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("tty");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(root.path().join("class/tty")).unwrap();
        std::os::unix::fs::symlink(root.path().join("class/tty"), dev.join("subsystem")).unwrap();
        let err = DaxSysfs::read(&dev, Path::new("/dev/tty")).unwrap_err();
        assert!(err.to_string().contains("not device-dax"), "{err}");
    }

    #[test]
    fn selected_word_reads_sysfs_choices() {
        assert_eq!(
            selected_word("always within_size advise [never] deny force"),
            Some("never".into())
        );
        assert_eq!(selected_word("nothing"), None);
    }
}
