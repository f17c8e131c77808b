//! What a test runs against: the library (`daxfs::Fs` on an emulated device
//! of its own) or a FUSE mount (system calls on files in a directory of
//! it). The tests are written once, against [`Target`].

use daxfs::pmem::{Device, DeviceOptions, SECTOR};
use daxfs::{DaxStats, Fs, MapOptions, Mapping};
use daxfs_client::fiemap;
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub type Res<T = ()> = Result<T, String>;

/// Fail the test with a message unless `cond`.
macro_rules! check {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}
pub(crate) use check;

/// An extent of a file, from the filesystem's extent report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub file_offset: u64,
    pub device_offset: u64,
    pub len: u64,
}

impl From<&fiemap::FiemapExtent> for Extent {
    fn from(e: &fiemap::FiemapExtent) -> Extent {
        Extent {
            file_offset: e.logical,
            device_offset: e.physical,
            len: e.length,
        }
    }
}

const PAGE: usize = 4096;

/// How to map.
#[derive(Clone, Copy, Debug)]
pub struct MapFlags {
    pub write: bool,
    pub shared: bool,
    pub populate: bool,
}

impl MapFlags {
    pub const SHARED_RW: MapFlags = MapFlags {
        write: true,
        shared: true,
        populate: false,
    };
}

/// A mapping of a file; unmapped on drop.
pub trait Map {
    fn ptr(&self) -> *mut u8;
    fn len(&self) -> usize;
    /// Make its stores durable (`msync`).
    fn sync(&self) -> Res;
    /// `mlock` (the library: [`Mapping::lock`]).
    fn lock(&self) -> Res;
    fn unlock(&self) -> Res;
    /// After the catcher replaced the page at `offset` by zeros: show the
    /// file there again (a library mapping does so by itself once the
    /// page's blocks change, as a DAX mapping does).
    fn restore(&self, offset: usize) -> Res;
}

pub trait Target {
    /// Create file `name`, empty (truncated if it exists).
    fn create(&self, name: &str) -> Res;
    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<usize>;
    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// `read` with `O_DIRECT` (the library's reads always go to the
    /// device).
    fn read_direct(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.read(name, offset, buf)
    }
    fn fsync(&self, name: &str) -> Res;
    fn punch(&self, name: &str, offset: u64, len: u64) -> io::Result<()>;
    /// Truncate the file to `len` from another party than the test's
    /// mappings: a process of its own (`truncate(1)`) on a mount, a thread
    /// of its own in the library.
    fn truncate_elsewhere(&self, name: &str, len: u64) -> Res;
    fn unlink(&self, name: &str) -> Res;
    fn extents(&self, name: &str) -> Res<Vec<Extent>>;
    /// The file's extents as `FS_IOC_FIEMAP` reports them (as ndctl asks
    /// for them); `None` where it is not offered (the kernel does not pass
    /// FIEMAP to FUSE, only the preload library answers it).
    fn fiemap(&self, name: &str) -> Res<Option<Vec<Extent>>>;
    /// Poison the device sectors behind `[offset, offset + len)` of the file.
    fn inject(&self, name: &str, offset: u64, len: u64) -> Res;
    /// The device's poisoned ranges, as `(first sector, count)`.
    fn media_errors(&self) -> Res<Vec<(u64, u64)>>;
    fn map(&self, name: &str, offset: u64, len: u64, flags: MapFlags) -> Res<Box<dyn Map>>;
    /// A shared writable mapping with `MAP_SYNC`'s promise, populated up
    /// front; `None` if the target refuses `MAP_SYNC` (`EOPNOTSUPP`).
    fn map_sync(&self, name: &str, offset: u64, len: u64) -> Res<Option<Box<dyn Map>>>;
    /// The library's fault counters (a mount's mappings are the kernel's,
    /// unless the preload library makes them the device's).
    fn dax_stats(&self) -> Option<DaxStats>;
    /// Whether mappings are of the device's own pages (the library, or a
    /// mount with the preload library), with fsdax's semantics.
    fn direct(&self) -> bool {
        self.dax_stats().is_some()
    }
    /// The library itself, for what only it offers (pins).
    fn library(&self) -> Option<&Fs>;
    /// Start listening to the fault trace (`Fs::trace_faults`, `daxfs
    /// trace`); `None` where faults are the kernel's.
    fn trace(&self) -> Res<Option<Box<dyn FaultTrace + '_>>>;
}

/// A fault trace being listened to; it stops when dropped.
pub trait FaultTrace {
    /// Read trace lines until `want` PMD faults that mapped
    /// (`dax_pmd_fault_done ... NOPAGE`) were seen, or no line comes for a
    /// while; how many were.
    fn pmd_nopage(&mut self, want: u64) -> Res<u64>;
}

fn is_pmd_nopage(line: &str) -> bool {
    line.contains("dax_pmd_fault_done: ") && line.ends_with(" NOPAGE")
}

/// Whether an I/O error is `errno`.
pub fn is_errno(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

// ---- the library ----------------------------------------------------------

/// A filesystem on an emulated device of its own; unmounted and deleted on
/// drop.
pub struct Library {
    fs: Option<Fs>,
    image: PathBuf,
}

impl Library {
    pub fn new(dir: &Path, label: &str, size: u64) -> Res<Library> {
        let image = dir.join(format!(
            "daxfs-dax-tests.{}.{label}.img",
            std::process::id()
        ));
        let dev = Device::create(&image, size, &DeviceOptions::new())
            .map_err(|e| format!("{}: {e}", image.display()))?;
        let fs = Fs::format(dev).map_err(|e| format!("{}: {e}", image.display()))?;
        Ok(Library {
            fs: Some(fs),
            image,
        })
    }

    pub fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("mounted until dropped")
    }

    fn ino(&self, name: &str) -> io::Result<daxfs::Ino> {
        self.fs().resolve(format!("/{name}")).map_err(errno)
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        if let Some(fs) = self.fs.take() {
            let _ = fs.unmount();
        }
        let _ = std::fs::remove_file(&self.image);
        let mut sidecar = self.image.clone().into_os_string();
        sidecar.push(".badblocks");
        let _ = std::fs::remove_file(sidecar);
    }
}

fn errno(e: daxfs::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl Target for Library {
    fn create(&self, name: &str) -> Res {
        let attr = self
            .fs()
            .create_path(format!("/{name}"), 0o644, false)
            .map_err(|e| format!("create {name}: {e}"))?;
        self.fs()
            .truncate(attr.ino, 0)
            .map_err(|e| format!("truncate {name}: {e}"))
    }

    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.fs()
            .write(self.ino(name)?, offset, data)
            .map_err(errno)
    }

    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.fs().read(self.ino(name)?, offset, buf).map_err(errno)
    }

    fn fsync(&self, name: &str) -> Res {
        let ino = self.ino(name).map_err(|e| format!("{name}: {e}"))?;
        self.fs()
            .fsync(ino)
            .map_err(|e| format!("fsync {name}: {e}"))
    }

    fn punch(&self, name: &str, offset: u64, len: u64) -> io::Result<()> {
        self.fs()
            .punch_hole(self.ino(name)?, offset, len)
            .map_err(errno)
    }

    fn truncate_elsewhere(&self, name: &str, len: u64) -> Res {
        let ino = self.ino(name).map_err(|e| format!("{name}: {e}"))?;
        let fs = self.fs();
        std::thread::scope(|s| s.spawn(|| fs.truncate(ino, len)).join())
            .map_err(|_| "the truncating thread panicked".to_string())?
            .map_err(|e| format!("truncate {name}: {e}"))
    }

    fn unlink(&self, name: &str) -> Res {
        self.fs()
            .unlink_path(format!("/{name}"))
            .map_err(|e| format!("unlink {name}: {e}"))
    }

    fn extents(&self, name: &str) -> Res<Vec<Extent>> {
        let ino = self.ino(name).map_err(|e| format!("{name}: {e}"))?;
        let extents = self
            .fs()
            .file_extents(ino)
            .map_err(|e| format!("extents of {name}: {e}"))?;
        Ok(extents
            .iter()
            .map(|e| Extent {
                file_offset: e.file_offset,
                device_offset: e.device_offset,
                len: e.len,
            })
            .collect())
    }

    fn fiemap(&self, name: &str) -> Res<Option<Vec<Extent>>> {
        let list = self.extents(name)?;
        let found = fiemap::answer(
            list.iter().map(|e| (e.file_offset, e.device_offset, e.len)),
            0,
            u64::MAX,
        );
        Ok(Some(found.iter().map(Extent::from).collect()))
    }

    fn inject(&self, name: &str, offset: u64, len: u64) -> Res {
        let ino = self.ino(name).map_err(|e| format!("{name}: {e}"))?;
        let at = self
            .fs()
            .device_offset(ino, offset)
            .map_err(|e| format!("{name}: {e}"))?
            .ok_or_else(|| format!("{name}: offset {offset} is a hole"))?;
        let at = at / SECTOR * SECTOR;
        self.fs()
            .inject_poison(at, len.next_multiple_of(SECTOR))
            .map(drop)
            .map_err(|e| format!("inject poison in {name}: {e}"))
    }

    fn media_errors(&self) -> Res<Vec<(u64, u64)>> {
        Ok(self
            .fs()
            .device()
            .badblocks()
            .iter()
            .map(|r| (r.sector, r.count))
            .collect())
    }

    fn map(&self, name: &str, offset: u64, len: u64, flags: MapFlags) -> Res<Box<dyn Map>> {
        let ino = self.ino(name).map_err(|e| format!("{name}: {e}"))?;
        let opts = MapOptions {
            write: flags.write,
            shared: flags.shared,
            populate: flags.populate,
        };
        // SAFETY: the tests touch mappings only through raw pointers, with
        // volatile accesses, never through slices that others may change.
        let mapping = unsafe { self.fs().mmap(ino, offset, len, opts) }
            .map_err(|e| format!("mmap {name}: {e}"))?;
        Ok(Box::new(LibraryMap(mapping)))
    }

    fn map_sync(&self, name: &str, offset: u64, len: u64) -> Res<Option<Box<dyn Map>>> {
        // Every shared library mapping keeps MAP_SYNC's promise: a write
        // fault commits the block mapping before the page is mapped.
        let flags = MapFlags {
            populate: true,
            ..MapFlags::SHARED_RW
        };
        self.map(name, offset, len, flags).map(Some)
    }

    fn dax_stats(&self) -> Option<DaxStats> {
        Some(self.fs().dax_stats())
    }

    fn library(&self) -> Option<&Fs> {
        Some(self.fs())
    }

    fn trace(&self) -> Res<Option<Box<dyn FaultTrace + '_>>> {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&lines);
        self.fs().trace_faults(Some(std::sync::Arc::new(
            move |e: &daxfs::dax::FaultEvent| seen.lock().unwrap().push(e.to_string()),
        )));
        Ok(Some(Box::new(LibraryTrace {
            fs: self.fs(),
            lines,
        })))
    }
}

/// The library's trace: events are collected as faults happen.
struct LibraryTrace<'a> {
    fs: &'a Fs,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FaultTrace for LibraryTrace<'_> {
    fn pmd_nopage(&mut self, _want: u64) -> Res<u64> {
        let lines = self.lines.lock().unwrap();
        Ok(lines.iter().filter(|l| is_pmd_nopage(l)).count() as u64)
    }
}

impl Drop for LibraryTrace<'_> {
    fn drop(&mut self) {
        self.fs.trace_faults(None);
    }
}

struct LibraryMap(Mapping);

impl Map for LibraryMap {
    fn ptr(&self) -> *mut u8 {
        self.0.as_ptr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn sync(&self) -> Res {
        self.0.sync().map_err(|e| format!("sync of a mapping: {e}"))
    }
    fn lock(&self) -> Res {
        self.0.lock().map_err(|e| format!("lock of a mapping: {e}"))
    }
    fn unlock(&self) -> Res {
        self.0
            .unlock()
            .map_err(|e| format!("unlock of a mapping: {e}"))
    }
    fn restore(&self, _offset: usize) -> Res {
        Ok(())
    }
}

// ---- a mount --------------------------------------------------------------

/// Files in a directory of a daxfs FUSE mount, and its control channel.
pub struct Mount {
    dir: PathBuf,
    mountpoint: PathBuf,
    /// `dir` as a path inside the mount.
    inside: String,
    /// The preload library's counters, when it is loaded in this process
    /// (then mappings of the mount's files are the device's pages).
    preload: Option<PreloadStats>,
}

type PreloadStats = unsafe extern "C" fn(*mut u64, usize) -> usize;

impl Mount {
    pub fn new(dir: &Path) -> Res<Mount> {
        let (mountpoint, inside) = crate::control::locate(dir)?;
        // SAFETY: looks a symbol up by a NUL-terminated name.
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"daxfs_preload_stats".as_ptr()) };
        // SAFETY: the preload library's function of that name has this
        // signature.
        let preload = (!f.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut libc::c_void, PreloadStats>(f) });
        Ok(Mount {
            dir: dir.to_path_buf(),
            mountpoint,
            inside,
            preload,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn open(&self, name: &str, write: bool) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(self.path(name))
    }

    fn ask(&self, request: Value) -> Res<String> {
        crate::control::output(&self.mountpoint, &request)
    }

    /// A mapping made by `mmap(2)`: the kernel's, or, with the preload
    /// library, the device's pages (which show the file again by
    /// themselves once a poisoned page's blocks change, as the library's
    /// do).
    fn preloaded(&self, mut m: KernelMap) -> Box<dyn Map> {
        m.remaps_itself = self.preload.is_some();
        Box::new(m)
    }
}

impl Target for Mount {
    fn create(&self, name: &str) -> Res {
        File::create(self.path(name))
            .map(drop)
            .map_err(|e| format!("create {name}: {e}"))
    }

    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.open(name, true)?.write_at(data, offset)
    }

    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.open(name, false)?.read_at(buf, offset)
    }

    fn read_direct(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(self.path(name))?;
        // Into a page-aligned buffer, as O_DIRECT may want.
        let mut bounce = vec![0u8; buf.len() + PAGE];
        let at = bounce.as_ptr().align_offset(PAGE);
        let got = file.read_at(&mut bounce[at..at + buf.len()], offset)?;
        buf[..got].copy_from_slice(&bounce[at..at + got]);
        Ok(got)
    }

    fn fsync(&self, name: &str) -> Res {
        self.open(name, true)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("fsync {name}: {e}"))
    }

    fn truncate_elsewhere(&self, name: &str, len: u64) -> Res {
        let out = std::process::Command::new("truncate")
            .arg("-s")
            .arg(len.to_string())
            .arg(self.path(name))
            .output()
            .map_err(|e| format!("cannot run truncate: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "truncate {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    fn punch(&self, name: &str, offset: u64, len: u64) -> io::Result<()> {
        let file = self.open(name, true)?;
        // SAFETY: fallocate on an open file descriptor.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn unlink(&self, name: &str) -> Res {
        std::fs::remove_file(self.path(name)).map_err(|e| format!("unlink {name}: {e}"))
    }

    fn extents(&self, name: &str) -> Res<Vec<Extent>> {
        let path = format!("{}/{name}", self.inside.trim_end_matches('/'));
        let text = self.ask(json!({ "op": "extents", "path": path, "json": true }))?;
        let list: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| format!("extent report of {name}: {e}"))?;
        list.iter()
            .map(|e| {
                let field = |key: &str| {
                    e[key]
                        .as_u64()
                        .ok_or_else(|| format!("extent report of {name}: no {key} in {e}"))
                };
                Ok(Extent {
                    file_offset: field("file_offset")?,
                    device_offset: field("device_offset")?,
                    len: field("length")?,
                })
            })
            .collect()
    }

    fn fiemap(&self, name: &str) -> Res<Option<Vec<Extent>>> {
        const ROOM: usize = 512;
        let file = self.open(name, false).map_err(|e| format!("{name}: {e}"))?;
        let mut buf = vec![0u8; fiemap::HEADER + ROOM * fiemap::EXTENT];
        buf[8..16].copy_from_slice(&u64::MAX.to_ne_bytes()); // fm_length
        buf[24..28].copy_from_slice(&(ROOM as u32).to_ne_bytes()); // fm_extent_count
                                                                   // SAFETY: a struct fiemap with room for ROOM extents.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), fiemap::FS_IOC_FIEMAP, buf.as_mut_ptr()) };
        if rc != 0 {
            return match io::Error::last_os_error() {
                e if is_errno(&e, libc::EOPNOTSUPP) => Ok(None),
                e => Err(format!("FIEMAP of {name}: {e}")),
            };
        }
        let mapped = u32::from_ne_bytes(buf[20..24].try_into().unwrap()) as usize;
        let end = fiemap::HEADER + mapped.min(ROOM) * fiemap::EXTENT;
        let found = fiemap::decode(&buf[fiemap::HEADER..end]);
        Ok(Some(found.iter().map(Extent::from).collect()))
    }

    fn inject(&self, name: &str, offset: u64, len: u64) -> Res {
        let path = format!("{}/{name}", self.inside.trim_end_matches('/'));
        self.ask(json!({
            "op": "inject_file", "path": path, "offset": offset,
            "len": len.next_multiple_of(SECTOR),
        }))
        .map(drop)
    }

    fn media_errors(&self) -> Res<Vec<(u64, u64)>> {
        let text = self.ask(json!({ "op": "list", "media_errors": true }))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| format!("list --media-errors: {e}"))?;
        let ranges = value["badblocks"]
            .as_array()
            .ok_or_else(|| format!("list --media-errors: no badblocks in {value}"))?;
        Ok(ranges
            .iter()
            .filter_map(|r| Some((r["offset"].as_u64()?, r["length"].as_u64()?)))
            .collect())
    }

    fn map(&self, name: &str, offset: u64, len: u64, flags: MapFlags) -> Res<Box<dyn Map>> {
        let mut mflags = if flags.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        if flags.populate {
            mflags |= libc::MAP_POPULATE;
        }
        KernelMap::new(
            self.open(name, flags.write),
            name,
            offset,
            len,
            flags.write,
            mflags,
        )
        .map(|m| self.preloaded(m))
    }

    fn map_sync(&self, name: &str, offset: u64, len: u64) -> Res<Option<Box<dyn Map>>> {
        let flags = libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC | libc::MAP_POPULATE;
        match KernelMap::new(self.open(name, true), name, offset, len, true, flags) {
            Ok(m) => Ok(Some(self.preloaded(m))),
            Err(e) if e.contains(&io::Error::from_raw_os_error(libc::EOPNOTSUPP).to_string()) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn dax_stats(&self) -> Option<DaxStats> {
        let stats = self.preload?;
        let mut c = [0u64; 11];
        // SAFETY: room for the 11 counters the library fills.
        let n = unsafe { stats(c.as_mut_ptr(), c.len()) };
        (n == c.len()).then_some(DaxStats {
            pmd_faults: c[0],
            pte_faults: c[1],
            zero_maps: c[2],
            fallback_misaligned: c[3],
            fallback_past_eof: c[4],
            fallback_not_huge_extent: c[5],
            fallback_pte_in_range: c[6],
            fallback_private_write: c[7],
            fallback_poisoned: c[8],
            poisoned_maps: c[9],
            beyond_eof: c[10],
        })
    }

    fn library(&self) -> Option<&Fs> {
        None
    }

    /// `daxfs trace`'s connection, where the preload makes faults ours.
    fn trace(&self) -> Res<Option<Box<dyn FaultTrace + '_>>> {
        use std::io::{BufRead, Write};
        if self.preload.is_none() {
            return Ok(None);
        }
        let at = |e: io::Error| format!("trace of {}: {e}", self.mountpoint.display());
        let stream = daxfs_client::socket::connect(&self.mountpoint)?;
        // A line that does not come within this is a fault not traced.
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .map_err(at)?;
        writeln!(&stream, "{}", json!({ "op": "trace" })).map_err(at)?;
        let mut lines = io::BufReader::new(stream);
        let mut first = String::new();
        lines.read_line(&mut first).map_err(at)?;
        check!(
            first.trim() == "tracing",
            "the daemon did not start the trace: {first}"
        );
        Ok(Some(Box::new(MountTrace { lines, seen: 0 })))
    }
}

/// `daxfs trace`'s connection: lines come from the daemon as faults
/// happen in this process; it stops when the connection closes.
struct MountTrace {
    lines: io::BufReader<std::os::unix::net::UnixStream>,
    seen: u64,
}

impl FaultTrace for MountTrace {
    fn pmd_nopage(&mut self, want: u64) -> Res<u64> {
        use std::io::BufRead;
        let mut line = String::new();
        while self.seen < want {
            line.clear();
            match self.lines.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => self.seen += u64::from(is_pmd_nopage(line.trim_end())),
            }
        }
        Ok(self.seen)
    }
}

/// A mapping made by the kernel (`mmap(2)` of a file of the mount).
struct KernelMap {
    _file: File,
    ptr: *mut u8,
    len: usize,
    offset: u64,
    prot: i32,
    flags: i32,
    /// Whether `restore` has nothing to do (a device mapping).
    remaps_itself: bool,
}

impl KernelMap {
    fn new(
        file: io::Result<File>,
        name: &str,
        offset: u64,
        len: u64,
        write: bool,
        flags: i32,
    ) -> Res<KernelMap> {
        let file = file.map_err(|e| format!("open {name}: {e}"))?;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new mapping of an open file, at an address the kernel picks.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                flags,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap {name}: {}", io::Error::last_os_error()));
        }
        Ok(KernelMap {
            _file: file,
            ptr: ptr.cast(),
            len: len as usize,
            offset,
            prot,
            // What `restore` maps again with: shared or private.
            flags: if flags & libc::MAP_TYPE == libc::MAP_PRIVATE {
                libc::MAP_PRIVATE
            } else {
                libc::MAP_SHARED
            },
            remaps_itself: false,
        })
    }

    fn os(&self, what: &str, rc: i32) -> Res {
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("{what}: {}", io::Error::last_os_error()))
        }
    }
}

impl Map for KernelMap {
    fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn sync(&self) -> Res {
        // SAFETY: our own mapping.
        let rc = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        self.os("msync", rc)
    }
    fn lock(&self) -> Res {
        // SAFETY: our own mapping; mlock changes no contents.
        let rc = unsafe { libc::mlock(self.ptr.cast(), self.len) };
        self.os("mlock", rc)
    }
    fn unlock(&self) -> Res {
        // SAFETY: as for `lock`.
        let rc = unsafe { libc::munlock(self.ptr.cast(), self.len) };
        self.os("munlock", rc)
    }
    fn restore(&self, offset: usize) -> Res {
        if self.remaps_itself {
            return Ok(());
        }
        let page = offset / 4096 * 4096;
        // SAFETY: one page of our own mapping, mapped again from the file.
        let got = unsafe {
            libc::mmap(
                self.ptr.add(page).cast(),
                4096,
                self.prot,
                self.flags | libc::MAP_FIXED,
                self._file.as_raw_fd(),
                (self.offset + page as u64) as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(format!("mmap again: {}", io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for KernelMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unused from now on.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
