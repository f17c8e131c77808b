//! Creating and opening devices, and refusing what is not one.

mod common;

use common::{shm_dir, small_device};
use pmem::{Device, DeviceOptions, Error, PersistenceMode, HUGE_PAGE};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

#[test]
fn create_makes_a_sparse_file_of_the_requested_size() {
    let dir = shm_dir();
    let path = dir.path().join("dev.img");
    let dev = Device::create(&path, 64 << 20, &DeviceOptions::new()).unwrap();
    assert_eq!(dev.size(), 64 << 20);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "a new device must be sparse");
}

#[test]
fn the_mapping_is_2mib_aligned() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    // SAFETY: only the address is inspected.
    let base = unsafe { dev.as_ptr() } as usize;
    assert_eq!(base % HUGE_PAGE as usize, 0, "base {base:#x}");
}

#[test]
fn sizes_that_are_not_allowed_are_refused_with_the_rule() {
    let dir = shm_dir();
    for size in [0, 4096, 8 << 20, (16 << 20) + 4096, (32 << 20) + (1 << 20)] {
        let path = dir.path().join(format!("bad-{size}.img"));
        let err = Device::create(&path, size, &DeviceOptions::new()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidSize { size: s } if s == size),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("multiple of 2 MiB") && msg.contains("16 MiB"),
            "{msg}"
        );
        assert!(!path.exists(), "a refused create must leave no file");
    }
}

#[test]
fn create_refuses_to_overwrite() {
    let dir = shm_dir();
    let path = dir.path().join("dev.img");
    std::fs::write(&path, b"precious").unwrap();
    let err = Device::create(&path, 16 << 20, &DeviceOptions::new()).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let dir = shm_dir();
    let path = dir.path().join("nothing-here.img");
    let msg = Device::open(&path, &DeviceOptions::new())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("nothing-here.img") && msg.contains("No such file"),
        "{msg}"
    );
}

#[test]
fn a_file_that_is_no_device_is_refused() {
    let dir = shm_dir();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"just some text\n").unwrap();
    let err = Device::open(&path, &DeviceOptions::new()).unwrap_err();
    assert!(matches!(err, Error::NotADevice { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("notes.txt") && msg.contains("15 bytes"),
        "{msg}"
    );
    // A directory is not a device either.
    let err = Device::open(dir.path(), &DeviceOptions::new()).unwrap_err();
    assert!(
        err.to_string().contains("not a pmem device") || err.to_string().contains("Is a directory"),
        "{err}"
    );
}

#[test]
fn a_second_open_in_the_same_process_names_this_process() {
    let dir = shm_dir();
    let (_dev, path) = small_device(&dir);
    let err = Device::open(&path, &DeviceOptions::new()).unwrap_err();
    match &err {
        Error::Busy { holder, .. } => assert_eq!(*holder, Some(std::process::id())),
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(err.to_string().contains("in use by this process"), "{err}");
}

#[test]
fn a_device_can_be_reopened_after_it_is_dropped() {
    let dir = shm_dir();
    let (dev, path) = small_device(&dir);
    dev.memcpy_persist(12345, b"kept").unwrap();
    drop(dev);
    let dev = Device::open(&path, &DeviceOptions::new()).unwrap();
    let mut buf = [0u8; 4];
    dev.read(12345, &mut buf).unwrap();
    assert_eq!(&buf, b"kept");
}

#[test]
fn tmpfs_is_memory_backed_and_a_disk_filesystem_needs_msync() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    assert_eq!(dev.persistence().mode, PersistenceMode::Memory);
    assert!(
        dev.persistence().reason.contains("tmpfs"),
        "{:?}",
        dev.persistence()
    );

    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let fs_type = nix_fs_type(disk.path());
    if fs_type == 0x0102_1994 {
        eprintln!("skipping the disk half: the target directory is on tmpfs");
        return;
    }
    let path = disk.path().join("disk.img");
    let dev = Device::create(&path, 16 << 20, &DeviceOptions::new()).unwrap();
    // A DAX-capable filesystem would accept MAP_SYNC; anything else is msync.
    assert!(
        matches!(
            dev.persistence().mode,
            PersistenceMode::Msync | PersistenceMode::Dax
        ),
        "{:?}",
        dev.persistence()
    );
    if dev.persistence().mode == PersistenceMode::Msync {
        assert!(dev.persistence().reason.contains("msync"));
        drop(dev);
        let fast = Device::open(&path, &DeviceOptions::new().fast(true)).unwrap();
        assert_eq!(fast.persistence().mode, PersistenceMode::Fast);
        // Writes still work in both modes.
        fast.memcpy_persist(0, b"fast").unwrap();
    }
}

fn nix_fs_type(path: &std::path::Path) -> i64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs writes into a struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    #[allow(clippy::unnecessary_cast)]
    {
        st.f_type as i64
    }
}

#[test]
fn info_reports_what_the_device_is() {
    let dir = shm_dir();
    let (dev, path) = small_device(&dir);
    let info = dev.info();
    assert_eq!(info.size, 16 << 20);
    assert_eq!(info.path, std::fs::canonicalize(&path).unwrap());
    assert_eq!(info.filesystem, "tmpfs");
    assert_eq!(info.poisoned_sectors, 0);
    assert!(!info.huge_pages.reason.is_empty());
    assert!(info.flush.is_available());
}

#[test]
fn accesses_outside_the_device_are_refused() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    let size = dev.size();
    let mut buf = [0u8; 8];
    assert!(matches!(
        dev.read(size - 4, &mut buf),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        dev.memcpy_persist(size, b"x"),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        dev.memset_persist(u64::MAX, 0, 2),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        dev.persist(size - 1, 2),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        dev.inject(size, 1),
        Err(Error::OutOfBounds { .. })
    ));
}

#[test]
fn a_character_device_that_is_not_dax_is_refused() {
    let err = Device::open("/dev/null", &DeviceOptions::new()).unwrap_err();
    assert!(matches!(err, Error::NotADevice { .. }), "{err:?}");
    assert!(err.to_string().contains("not device-dax"), "{err}");
}

/// A tmpfs mounted `huge=always` in a temporary directory, unmounted on drop.
struct HugeTmpfs(tempfile::TempDir);

impl HugeTmpfs {
    fn mount() -> Option<HugeTmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "huge=always,size=64m",
                "pmem-test-huge",
            ])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(HugeTmpfs(dir))
    }
}

impl Drop for HugeTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// The size of the PMD mappings of file pages in the mapping that starts at `base`.
fn pmd_mapped_kib(base: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = usize::from_str_radix(start, 16) {
                    inside = start == base;
                    continue;
                }
            }
        }
        if inside {
            if let Some(rest) = line
                .strip_prefix("FilePmdMapped:")
                .or(line.strip_prefix("ShmemPmdMapped:"))
            {
                return rest
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
            }
        }
    }
    0
}

#[test]
fn a_device_on_a_huge_tmpfs_is_mapped_with_2mib_pages() {
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a huge=always tmpfs needs root");
        return;
    }
    let Some(tmpfs) = HugeTmpfs::mount() else {
        eprintln!("skipped: this kernel cannot mount a huge=always tmpfs");
        return;
    };
    let dev = Device::create(
        tmpfs.0.path().join("huge.img"),
        16 << 20,
        &DeviceOptions::new(),
    )
    .unwrap();
    let info = dev.info();
    assert!(info.huge_pages.capable, "{:?}", info.huge_pages);
    assert!(
        info.huge_pages.reason.contains("huge=always"),
        "{}",
        info.huge_pages.reason
    );
    dev.memset_persist(4 << 20, 0xAB, 4 << 20).unwrap();
    // SAFETY: only the address is used, to find the mapping in smaps.
    let base = unsafe { dev.as_ptr() } as usize;
    // SAFETY: reading bytes the API just wrote, with no writer racing.
    let first = unsafe { std::ptr::read_volatile(dev.as_ptr().add(4 << 20)) };
    assert_eq!(first, 0xAB);
    let pmd = pmd_mapped_kib(base);
    assert!(
        pmd >= 2048,
        "the aligned mapping should hold at least one PMD, smaps says {pmd} kB"
    );
    drop(dev);
}

/// An immutable file: set with `chattr +i`, cleared on drop (also when the
/// test fails), so that the temporary directory can go.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &std::path::Path) -> Immutable {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .expect("run chattr")
            .success();
        assert!(ok, "chattr +i {}", path.display());
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A read-only open works on a file nobody may write (immutable), shares
/// with other read-only opens, keeps writers out, and never changes a
/// byte of the image, whatever is stored through it.
#[test]
fn a_read_only_device_never_writes_the_image() {
    let dir = shm_dir();
    let (dev, path) = small_device(&dir);
    dev.memcpy_persist(4096, b"original").unwrap();
    dev.inject(8192, 512).unwrap();
    drop(dev);
    let before = std::fs::read(&path).unwrap();
    let badblocks = std::fs::read(path.with_extension("img.badblocks")).unwrap();
    let _immutable = Immutable::set(&path);
    let ro = DeviceOptions::new().read_only(true);
    assert!(
        Device::open(&path, &DeviceOptions::new()).is_err(),
        "immutable"
    );
    assert!(!pmem::device_in_use(&path).unwrap());
    let dev = Device::open(&path, &ro).unwrap();
    assert!(
        pmem::device_in_use(&path).unwrap(),
        "a read-only open holds it"
    );
    let other = Device::open(&path, &ro).expect("read-only opens share the device");
    assert!(dev.is_read_only());
    assert_eq!(
        dev.persistence().mode,
        PersistenceMode::Memory,
        "the device's nature, however it is opened"
    );
    // Stores change this process's copy.
    dev.memcpy_persist(4096, b"changed!").unwrap();
    dev.memset_persist(1 << 20, 0xaa, 1 << 20).unwrap();
    let mut got = [0u8; 8];
    dev.read(4096, &mut got).unwrap();
    assert_eq!(&got, b"changed!");
    other.read(4096, &mut got).unwrap();
    assert_eq!(&got, b"original", "another open sees the image");
    // What would write the image is refused, and says so.
    for err in [
        dev.inject(0, 512).unwrap_err(),
        dev.clear(8192, 512).unwrap_err(),
        dev.memcpy_persist(8192, &[0; 512]).unwrap_err(),
    ] {
        assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
        assert!(err.to_string().contains("read-only"), "{err}");
    }
    // The good sectors of a poisoned page still read.
    let mut good = [1u8; 512];
    dev.read(8192 + 512, &mut good).unwrap();
    drop((dev, other));
    assert!(!pmem::device_in_use(&path).unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(
        std::fs::read(path.with_extension("img.badblocks")).unwrap(),
        badblocks
    );
}

/// A device opened read-write and made private for a while writes nothing
/// of what was stored meanwhile; shared again, it writes as before.
#[test]
fn a_device_made_private_drops_its_changes_when_shared_again() {
    let dir = shm_dir();
    let (mut dev, path) = small_device(&dir);
    dev.memcpy_persist(0, b"before").unwrap();
    dev.inject(1 << 20, 512).unwrap();
    dev.set_private(true).unwrap();
    dev.memcpy_persist(0, b"during").unwrap();
    assert!(matches!(
        dev.inject(0, 512).unwrap_err(),
        Error::ReadOnly { .. }
    ));
    let mut got = [0u8; 6];
    dev.read(0, &mut got).unwrap();
    assert_eq!(&got, b"during");
    assert_eq!(&std::fs::read(&path).unwrap()[..6], b"before");
    dev.set_private(false).unwrap();
    dev.read(0, &mut got).unwrap();
    assert_eq!(&got, b"before", "the private change is gone");
    assert!(
        dev.read(1 << 20, &mut got).is_err(),
        "the poison is still there"
    );
    dev.memcpy_persist(0, b"after!").unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[..6], b"after!");
}
