//! The device: a mapped pmem namespace, emulated by a file or real (`/dev/dax`),
//! with its persistence primitives and its poison.
//!
//! ## Access rules
//!
//! Every safe call names device offsets and is bounds-checked. The device is
//! shared memory, like a file written with `pwrite`: calls take `&self`, and
//! two threads that write the same bytes at once leave those bytes unspecified
//! (the filesystem's own locks keep that from happening).
//!
//! ## Poison
//!
//! Poisoned sectors are kept in a list (see [`crate::badblocks`]). Each 4 KiB
//! page (more precisely: each *granule*, the smallest piece the mapping can be
//! split into, which is larger on hugetlbfs or a 2 MiB-aligned `/dev/dax`) that
//! holds a poisoned sector is replaced in the device mapping by a page of an
//! empty file, so that a direct load raises `SIGBUS` as a machine check would.
//! The API's own reads and writes never touch such a page through the mapping:
//! they reach its good sectors through a short-lived second mapping (a window).
//! A reader-writer lock orders API calls (readers) against poison changes
//! (writers), so an inject never pulls a page from under a copy in flight.

use crate::backing::{Backing, DeviceKind, HugePages, Persistence, PersistenceMode};
use crate::badblocks::{BadBlocks, BadRange, Sidecar, SECTOR};
use crate::copy::{MovntKernel, Writer};
use crate::cpu::{self, FlushInstruction};
use crate::crash::{CrashPoint, CrashTracker, FenceHook};
use crate::error::{Error, Result};
use crate::lock::lock;
use crate::mapping::{MapMode, Mapping, Window, HUGE_PAGE};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The smallest device: 16 MiB.
pub const MIN_SIZE: u64 = 16 << 20;
/// The largest device: 64 TiB. The device is mapped whole into the
/// process (x86-64 user space is 128 TiB).
pub const MAX_SIZE: u64 = 64 << 40;
/// Device sizes are multiples of this: 2 MiB.
pub const SIZE_ALIGN: u64 = HUGE_PAGE;

/// Check that `size` is an allowed device size.
pub fn validate_size(size: u64) -> Result<()> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) || !size.is_multiple_of(SIZE_ALIGN) {
        return Err(Error::InvalidSize { size });
    }
    Ok(())
}

/// How to open a device.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    fast: bool,
    crash_tracking: bool,
    read_only: bool,
}

impl DeviceOptions {
    /// Defaults: full durability, no crash tracking.
    pub fn new() -> DeviceOptions {
        DeviceOptions::default()
    }

    /// Fast mode: on a disk-backed image, `persist` does not call `msync`
    /// (so a machine crash can lose writes that `persist` returned from).
    /// Changes nothing on memory-backed or DAX devices.
    pub fn fast(mut self, fast: bool) -> DeviceOptions {
        self.fast = fast;
        self
    }

    /// Read-only: open the file for reading (so a read-only file, or one
    /// marked immutable, can be opened), take a lock that other read-only
    /// opens share, and map it privately: stores then change a copy in this
    /// process's memory and never the image. Changing poison is refused.
    pub fn read_only(mut self, on: bool) -> DeviceOptions {
        self.read_only = on;
        self
    }

    /// Test mode: record which cache lines a power failure could lose (see
    /// [`crate::crash`]). It makes every store slower.
    pub fn crash_tracking(mut self, on: bool) -> DeviceOptions {
        self.crash_tracking = on;
        self
    }
}

/// A description of an open device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's canonical path.
    pub path: PathBuf,
    /// Emulated file or device-dax.
    pub kind: DeviceKind,
    /// Size in bytes.
    pub size: u64,
    /// Mapping alignment in bytes.
    pub align: u64,
    /// The filesystem the image lives on (for device-dax: devtmpfs).
    pub filesystem: String,
    /// How stores become durable, and why.
    pub persistence: Persistence,
    /// Whether 2 MiB mappings are possible, and why.
    pub huge_pages: HugePages,
    /// The cache-flush instruction in use.
    pub flush: FlushInstruction,
    /// The non-temporal store kernel in use.
    pub movnt: Option<MovntKernel>,
    /// How many 512-byte sectors are poisoned.
    pub poisoned_sectors: u64,
    /// Where the poison list is kept.
    pub badblocks_file: PathBuf,
}

/// The result of a machine-check-safe read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McsafeRead {
    /// Bytes copied into the buffer, from its start.
    pub copied: usize,
    /// When the read stopped at poison: the device offset of the first
    /// poisoned byte it reached.
    pub poison: Option<u64>,
}

/// What a scrub found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubReport {
    /// Bytes whose media was read.
    pub scanned: u64,
    /// The poisoned ranges, in device order.
    pub poisoned: Vec<BadRange>,
}

/// The poison state, behind the device's reader-writer lock.
struct Poison {
    /// Poison injected by software (kept in the sidecar file).
    injected: BadBlocks,
    /// Poison the kernel reports (device-dax only); cannot be cleared here.
    kernel: BadBlocks,
    /// The union of both: what every access consults.
    all: BadBlocks,
    sidecar: Sidecar,
    /// An empty file whose pages stand in for poisoned granules.
    sigbus_file: OwnedFd,
}

impl Poison {
    fn rebuild(&mut self) {
        let mut all = self.injected.clone();
        for run in self.kernel.ranges() {
            all.insert(run.sector, run.count);
        }
        self.all = all;
    }
}

/// Reserves an emulated device's storage (see [`Device::reserver`]).
#[derive(Debug)]
pub struct Reserver {
    file: File,
    path: PathBuf,
    size: u64,
}

impl Reserver {
    /// Make the backing filesystem hold storage for `[offset, offset +
    /// len)` of the device (clipped to it), so that stores there cannot
    /// find it full. A filesystem that cannot reserve (no `fallocate`) is
    /// left to do as it can.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a descriptor we own, with integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(()),
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Err(Error::NoSpace {
                path: self.path.clone(),
                offset,
                len,
            }),
            _ => Err(Error::io(&self.path, "reserve storage for the device", e)),
        }
    }
}

/// A mapped pmem device. See the [module documentation](self).
pub struct Device {
    path: PathBuf,
    file: File,
    backing: Backing,
    map: Mapping,
    persistence: Persistence,
    writer: Writer,
    /// Whether flushes must also `msync` (a disk-backed image, not in fast mode).
    msync: bool,
    /// The mapping is private, the file never written (opened read-only,
    /// or made private by [`Device::set_private`]).
    read_only: bool,
    /// Opened read-only: it can never be made shared.
    opened_read_only: bool,
    /// How the mapping is shared when it is not private.
    shared_mode: MapMode,
    poison: RwLock<Poison>,
    tracker: Option<CrashTracker>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("path", &self.path)
            .field("size", &self.size())
            .field("persistence", &self.persistence.mode)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Create a sparse emulated device of `size` bytes at `path` (which must
    /// not exist) and open it.
    pub fn create(path: impl AsRef<Path>, size: u64, options: &DeviceOptions) -> Result<Device> {
        let path = path.as_ref();
        validate_size(size)?;
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Error::AlreadyExists {
                    path: path.to_path_buf(),
                },
                _ => Error::io(path, "create the device", e),
            })?;
        let created = (|| {
            file.set_len(size)
                .map_err(|e| Error::io(path, "size the device", e))?;
            let canonical = canonical(path)?;
            // A new device has no poison, whatever an older file of that name had.
            Sidecar::beside(&canonical).store(&BadBlocks::default())?;
            Device::from_file(file, path, options)
        })();
        if created.is_err() {
            let _ = std::fs::remove_file(path);
        }
        created
    }

    /// Open an existing emulated device or `/dev/daxX.Y`, exclusively (or,
    /// read-only, shared with other read-only opens).
    pub fn open(path: impl AsRef<Path>, options: &DeviceOptions) -> Result<Device> {
        let path = path.as_ref();
        let file = File::options()
            .read(true)
            .write(!options.read_only)
            .open(path)
            .map_err(|e| Error::io(path, "open the device", e))?;
        Device::from_file(file, path, options)
    }

    fn from_file(file: File, path: &Path, options: &DeviceOptions) -> Result<Device> {
        lock(&file, path, options.read_only)?;
        let backing = Backing::probe(&file, path)?;
        if !(MIN_SIZE..=MAX_SIZE).contains(&backing.size) || backing.size % SIZE_ALIGN != 0 {
            return Err(Error::NotADevice {
                path: path.to_path_buf(),
                reason: format!(
                    "its size, {} bytes, is not a multiple of 2 MiB from 16 MiB to 64 TiB",
                    backing.size
                ),
            });
        }
        let len = usize::try_from(backing.size).map_err(|_| Error::NotADevice {
            path: path.to_path_buf(),
            reason: "too large to map in this address space".to_string(),
        })?;
        // A /dev/dax may be aligned to 1 GiB: map it so that its own unit fits.
        let align = backing.align.max(HUGE_PAGE).next_power_of_two() as usize;
        let (map, shared_mode) = Mapping::map_aligned(file.as_fd(), len, align, options.read_only)
            .map_err(|e| Error::io(path, "map the device", e))?;
        if backing.huge_pages.capable && matches!(backing.kind, DeviceKind::Emulated) {
            // SAFETY: advice on our own mapping; it changes no contents.
            unsafe { libc::madvise(map.base().cast(), len, libc::MADV_HUGEPAGE) };
        }
        let persistence = backing.persistence(shared_mode, options.fast);
        let canonical_path = canonical(path)?;
        let sectors = backing.size / SECTOR;
        let sidecar = match &backing.kind {
            DeviceKind::Emulated => Sidecar::beside(&canonical_path),
            DeviceKind::DevDax { name } => {
                Sidecar::at(PathBuf::from(format!("/run/daxfs/{name}.badblocks")))
            }
        };
        let injected = sidecar.load(sectors)?;
        let kernel = read_kernel_badblocks(&backing, sectors);
        let mut poison = Poison {
            injected,
            kernel,
            all: BadBlocks::default(),
            sidecar,
            sigbus_file: crate::mapping::sigbus_file(c"daxfs-poison")
                .map_err(|e| Error::io(path, "create the poison stand-in", e))?,
        };
        poison.rebuild();
        let device = Device {
            msync: persistence.mode == PersistenceMode::Msync && !options.read_only,
            read_only: options.read_only,
            opened_read_only: options.read_only,
            shared_mode,
            path: canonical_path,
            persistence,
            writer: Writer::detect(),
            tracker: options.crash_tracking.then(CrashTracker::default),
            poison: RwLock::new(poison),
            file,
            backing,
            map,
        };
        {
            let poison = device.poison_ref();
            for run in poison.all.ranges() {
                device.swap_granules(&poison, run.offset(), run.len())?;
            }
        }
        Ok(device)
    }

    /// The device's size in bytes.
    pub fn size(&self) -> u64 {
        self.backing.size
    }

    /// Whether the device was opened read-only (see
    /// [`DeviceOptions::read_only`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Make the device private (stores change this process's copy only,
    /// and the image is never written; changing poison is refused) or, on
    /// a device opened read-write, shared again, dropping every private
    /// change. fsck's check uses it to look at what a mount would do
    /// without changing a byte.
    pub fn set_private(&mut self, private: bool) -> Result<()> {
        if private == self.read_only {
            return Ok(());
        }
        if !private && self.opened_read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
                what: "sharing the mapping again",
            });
        }
        let mode = if private {
            MapMode::Private
        } else {
            self.shared_mode
        };
        // SAFETY: `&mut self`: no API call is using the mapping, and the
        // raw-pointer contract (`as_ptr`) forbids holding its pages across
        // a change of the device.
        unsafe { self.map.remap(self.file.as_fd(), mode) }
            .map_err(|e| Error::io(&self.path, "remap the device", e))?;
        self.read_only = private;
        self.msync = !private && self.persistence.mode == PersistenceMode::Msync;
        let poison = self.poison_ref();
        for run in poison.all.ranges() {
            self.swap_granules(&poison, run.offset(), run.len())?;
        }
        Ok(())
    }

    /// What reserves the storage under ranges of this device before they
    /// are first stored to: for a writable emulated device, whose file may
    /// be sparse on a filesystem that can fill up (`None` for a device-dax
    /// or a read-only device). A store through the mapping into a page the
    /// filesystem cannot back raises `SIGBUS`, which kills the process;
    /// a reservation fails with [`Error::NoSpace`] instead.
    pub fn reserver(&self) -> Option<Reserver> {
        if self.read_only || !matches!(self.backing.kind, DeviceKind::Emulated) {
            return None;
        }
        let file = self.file.try_clone().ok()?;
        Some(Reserver {
            file,
            path: self.path.clone(),
            size: self.size(),
        })
    }

    /// The device's canonical path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How stores become durable on this device, and why.
    pub fn persistence(&self) -> &Persistence {
        &self.persistence
    }

    /// A full description of the device.
    pub fn info(&self) -> DeviceInfo {
        let poison = self.poison_ref();
        DeviceInfo {
            path: self.path.clone(),
            kind: self.backing.kind.clone(),
            size: self.size(),
            align: self.backing.align,
            filesystem: self.backing.fs_name.clone(),
            persistence: self.persistence.clone(),
            huge_pages: self.backing.huge_pages.clone(),
            flush: self.writer.flush,
            movnt: self.writer.movnt,
            poisoned_sectors: poison.all.sector_count(),
            badblocks_file: poison.sidecar.path().to_path_buf(),
        }
    }

    // ---- persistence primitives -------------------------------------------

    /// Write back the cache lines of `[offset, offset + len)`; they become
    /// durable at the next [`drain`](Self::drain). On a disk-backed image this
    /// also `msync`s the range (unless the device was opened in fast mode).
    pub fn flush(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        let poison = self.poison_ref();
        self.flush_checked(&poison, offset, len)
    }

    /// Wait until every earlier flush and non-temporal store is durable.
    pub fn drain(&self) {
        self.drain_unless(false);
    }

    /// Drain, skipping the fence instruction when the caller's last store
    /// already ended with one (crash tracking still sees a fence).
    fn drain_unless(&self, fenced: bool) {
        if !fenced {
            cpu::drain();
        }
        if let Some(tracker) = &self.tracker {
            let poison = self.poison_ref();
            let read = |off: u64, buf: &mut [u8]| self.read_raw(&poison, off, buf);
            tracker.lock().fence(self.size(), &read);
        }
    }

    /// Make `[offset, offset + len)` durable: flush, then drain.
    pub fn persist(&self, offset: u64, len: u64) -> Result<()> {
        self.flush(offset, len)?;
        self.drain();
        Ok(())
    }

    /// Store `src` at `offset` with ordinary cached stores, without flushing.
    /// Nothing is durable until a flush and a drain cover it.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<()> {
        self.store(offset, src.len() as u64, false, |dst, at, len| {
            // SAFETY: `store` hands out a destination valid for `len` bytes at
            // position `at` of the range, and `src` has those bytes.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(at), dst, len) };
            false
        })
        .map(drop)
    }

    /// Copy `src` to `offset` and flush it (non-temporal stores from 256 bytes
    /// up), without the final fence: it is durable after the next
    /// [`drain`](Self::drain). A copy that covers whole poisoned sectors clears
    /// them; one that covers part of a poisoned sector fails.
    pub fn memcpy_nodrain(&self, offset: u64, src: &[u8]) -> Result<()> {
        self.copy(offset, src).map(drop)
    }

    fn copy(&self, offset: u64, src: &[u8]) -> Result<bool> {
        let writer = self.writer;
        self.store(offset, src.len() as u64, true, |dst, at, len| {
            // SAFETY: as in `write`; the writer's instructions were detected on
            // this CPU.
            unsafe { writer.copy_flushed(dst, src.as_ptr().add(at), len) }
        })
    }

    /// [`memcpy_nodrain`](Self::memcpy_nodrain), then drain: durable on return.
    pub fn memcpy_persist(&self, offset: u64, src: &[u8]) -> Result<()> {
        let fenced = self.copy(offset, src)?;
        self.drain_unless(fenced);
        Ok(())
    }

    /// Fill `len` bytes at `offset` with `byte` and flush them, without the
    /// final fence. Poison is treated as by [`memcpy_nodrain`](Self::memcpy_nodrain).
    pub fn memset_nodrain(&self, offset: u64, byte: u8, len: u64) -> Result<()> {
        self.fill(offset, byte, len).map(drop)
    }

    fn fill(&self, offset: u64, byte: u8, len: u64) -> Result<bool> {
        let writer = self.writer;
        self.store(offset, len, true, |dst, _, len| {
            // SAFETY: `store` hands out a destination valid for `len` bytes.
            unsafe { writer.fill_flushed(dst, byte, len) }
        })
    }

    /// [`memset_nodrain`](Self::memset_nodrain), then drain: durable on return.
    pub fn memset_persist(&self, offset: u64, byte: u8, len: u64) -> Result<()> {
        let fenced = self.fill(offset, byte, len)?;
        self.drain_unless(fenced);
        Ok(())
    }

    // ---- reads ----------------------------------------------------------------

    /// Copy from `offset` into `buf`, stopping at the first poisoned sector,
    /// as Linux's `copy_mc_to_kernel` does: the result says how many bytes
    /// came and where the poison starts.
    pub fn read_mcsafe(&self, offset: u64, buf: &mut [u8]) -> Result<McsafeRead> {
        let len = buf.len() as u64;
        self.check(offset, len)?;
        let poison = self.poison_ref();
        let poisoned = if len == 0 || poison.all.is_empty() {
            None
        } else {
            poison
                .all
                .first_in(offset / SECTOR, (offset + len).div_ceil(SECTOR))
                .map(|sector| (sector * SECTOR).max(offset))
        };
        let copied = poisoned.map_or(buf.len(), |at| (at - offset) as usize);
        self.read_raw(&poison, offset, &mut buf[..copied]);
        Ok(McsafeRead {
            copied,
            poison: poisoned,
        })
    }

    /// Read all of `buf` from `offset`, or fail with [`Error::Poisoned`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.read_mcsafe(offset, buf)? {
            McsafeRead {
                poison: Some(offset),
                ..
            } => Err(Error::Poisoned { offset }),
            McsafeRead { .. } => Ok(()),
        }
    }

    // ---- poison -----------------------------------------------------------

    /// Poison every 512-byte sector that overlaps `[offset, offset + len)`.
    /// The list is saved before the call returns; the pages that hold those
    /// sectors raise `SIGBUS` on direct access from then on.
    pub fn inject(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.writable("injecting poison")?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / SECTOR;
        let end = (offset + len).div_ceil(SECTOR);
        let mut poison = self.poison_mut();
        let mut injected = poison.injected.clone();
        injected.insert(first, end - first);
        poison.sidecar.store(&injected)?;
        poison.injected = injected;
        poison.rebuild();
        self.swap_granules(&poison, first * SECTOR, (end - first) * SECTOR)
    }

    /// Clear the poison of the whole sectors `[offset, offset + len)` (both
    /// must be multiples of 512). Cleared sectors read as zeros afterwards, as
    /// after `ndctl clear-errors`; the pages become accessible again once none
    /// of their sectors is poisoned.
    pub fn clear(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.writable("clearing poison")?;
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Error::Unaligned {
                offset,
                len,
                align: SECTOR,
            });
        }
        let mut poison = self.poison_mut();
        let cleared = poison.all.clipped(offset / SECTOR, (offset + len) / SECTOR);
        self.clear_locked(&mut poison, offset, len)?;
        for run in cleared {
            self.store_locked(&poison, run.offset(), run.len(), true, |dst, _, n| {
                // SAFETY: `store_locked` hands out a destination valid for `n` bytes.
                unsafe { self.writer.fill_flushed(dst, 0, n) }
            })?;
        }
        drop(poison);
        self.drain();
        Ok(())
    }

    /// Clear every injected poisoned sector.
    pub fn clear_all(&self) -> Result<()> {
        let ranges: Vec<BadRange> = self.poison_ref().injected.ranges().collect();
        for run in ranges {
            self.clear(run.offset(), run.len())?;
        }
        Ok(())
    }

    /// The device offset of the first poisoned sector that overlaps
    /// `[offset, offset + len)`, if any. Cheap when the device has no poison.
    pub fn first_poison(&self, offset: u64, len: u64) -> Option<u64> {
        let poison = self.poison_ref();
        if poison.all.is_empty() || len == 0 {
            return None;
        }
        let end = offset.saturating_add(len);
        poison
            .all
            .first_in(offset / SECTOR, end.div_ceil(SECTOR))
            .map(|sector| sector * SECTOR)
    }

    /// The poisoned ranges, in device order.
    pub fn badblocks(&self) -> Vec<BadRange> {
        self.poison_ref().all.ranges().collect()
    }

    /// Read the media of the whole device, as an address-range scrub does, and
    /// report every poisoned range. A device-dax first re-reads the kernel's
    /// list. Holes of a sparse emulated image hold no media and are not read
    /// (their poison, if any, is known from the list). `progress` is told
    /// `(bytes done, bytes in all)`.
    pub fn scrub(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ScrubReport> {
        if self.backing.kernel_badblocks.is_some() {
            let kernel = read_kernel_badblocks(&self.backing, self.size() / SECTOR);
            let mut poison = self.poison_mut();
            poison.kernel = kernel;
            poison.rebuild();
            let all: Vec<BadRange> = poison.all.ranges().collect();
            for run in all {
                self.swap_granules(&poison, run.offset(), run.len())?;
            }
        }
        const CHUNK: u64 = HUGE_PAGE;
        let size = self.size();
        let mut scratch = vec![0u8; CHUNK as usize];
        let mut found = BadBlocks::default();
        let mut scanned = 0;
        let mut chunk = 0;
        while chunk < size {
            let mut at = chunk;
            let end = chunk + CHUNK;
            while at < end {
                let Some((data, data_end)) = self.next_data(at, end) else {
                    break;
                };
                let buf = &mut scratch[..(data_end - data) as usize];
                let read = self.read_mcsafe(data, buf)?;
                scanned += read.copied as u64;
                at = data + read.copied as u64;
                if let Some(bad) = read.poison {
                    let sector = bad / SECTOR;
                    found.insert(sector, 1);
                    scanned += SECTOR - (at - sector * SECTOR);
                    at = (sector + 1) * SECTOR;
                }
            }
            chunk = end;
            progress(chunk, size);
        }
        // Poison in a hole of a sparse image was not read above: the list is
        // the emulated media's own record of it.
        for run in self.poison_ref().all.ranges() {
            found.insert(run.sector, run.count);
        }
        Ok(ScrubReport {
            scanned,
            poisoned: found.ranges().collect(),
        })
    }

    // ---- crash tracking ---------------------------------------------------

    /// Whether the device tracks crash state.
    pub fn is_crash_tracking(&self) -> bool {
        self.tracker.is_some()
    }

    /// Call `f` with the crash point of this moment (`None` without crash
    /// tracking). Stores from other threads wait until `f` returns.
    pub fn with_crash_point<R>(&self, f: impl FnOnce(&CrashPoint<'_>) -> R) -> Option<R> {
        let tracker = self.tracker.as_ref()?;
        let poison = self.poison_ref();
        let read = |off: u64, buf: &mut [u8]| self.read_raw(&poison, off, buf);
        let state = tracker.lock();
        Some(f(&state.point(self.size(), &read)))
    }

    /// Have `hook` called at every fence, before the flushed lines become
    /// durable (`None` removes it). The hook must not store to this device.
    /// Without crash tracking this does nothing and returns false.
    pub fn on_fence(&self, hook: Option<FenceHook>) -> bool {
        match &self.tracker {
            Some(tracker) => {
                tracker.lock().set_hook(hook);
                true
            }
            None => false,
        }
    }

    // ---- raw access -------------------------------------------------------

    /// The address of device offset 0 in this process's mapping.
    ///
    /// # Safety
    /// Whoever dereferences the result must stay within [`size`](Self::size)
    /// bytes, must not race with API writes to the same bytes, and must expect
    /// `SIGBUS` on a poisoned page. Stores through it bypass crash tracking
    /// and are durable only after [`persist`](Self::persist) covers them.
    pub unsafe fn as_ptr(&self) -> *mut u8 {
        self.map.base()
    }

    // ---- internals --------------------------------------------------------

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    fn writable(&self, what: &'static str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
                what,
            });
        }
        Ok(())
    }

    fn poison_ref(&self) -> RwLockReadGuard<'_, Poison> {
        self.poison.read().unwrap_or_else(|e| e.into_inner())
    }

    fn poison_mut(&self) -> RwLockWriteGuard<'_, Poison> {
        self.poison.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Store `len` bytes at `offset` through `op(dst, position, len)`, which
    /// writes the bytes at `position` of the range to `dst` and says whether
    /// it ended with a fence. `flushed` says that `op` flushes what it writes.
    /// Returns whether every piece ended with a fence. Poison in the range: covered whole
    /// sectors are cleared first, a partly covered one refuses the store.
    fn store(
        &self,
        offset: u64,
        len: u64,
        flushed: bool,
        op: impl FnMut(*mut u8, usize, usize) -> bool,
    ) -> Result<bool> {
        self.check(offset, len)?;
        {
            let poison = self.poison_ref();
            if !self.touches_poison(&poison, offset, len) {
                return self.store_locked(&poison, offset, len, flushed, op);
            }
        }
        // The good sectors of a poisoned page are reached through a window
        // onto the file, and covering a poisoned sector clears it in the
        // badblocks file: both write more than a private copy.
        self.writable("a store to a poisoned page")?;
        let mut poison = self.poison_mut();
        let first = offset / SECTOR;
        let last = (offset + len).div_ceil(SECTOR);
        let is_bad = |sector: u64| poison.all.first_in(sector, sector + 1).is_some();
        if !offset.is_multiple_of(SECTOR) && is_bad(first) {
            return Err(Error::PartialPoisonWrite {
                sector_offset: first * SECTOR,
            });
        }
        if !(offset + len).is_multiple_of(SECTOR) && is_bad(last - 1) {
            return Err(Error::PartialPoisonWrite {
                sector_offset: (last - 1) * SECTOR,
            });
        }
        let whole_start = offset.div_ceil(SECTOR) * SECTOR;
        let whole_end = (offset + len) / SECTOR * SECTOR;
        if whole_end > whole_start {
            self.clear_locked(&mut poison, whole_start, whole_end - whole_start)?;
        }
        self.store_locked(&poison, offset, len, flushed, op)
    }

    /// Drop the poison of the whole sectors in `[offset, offset + len)` from
    /// the list (saved first) and give back the granules left clean.
    fn clear_locked(&self, poison: &mut Poison, offset: u64, len: u64) -> Result<()> {
        let (first, end) = (offset / SECTOR, (offset + len) / SECTOR);
        if let Some(sector) = poison.kernel.first_in(first, end) {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "the poison at sector {sector} is reported by the kernel and can only be \
                     cleared by the platform (`ndctl clear-errors`)"
                ),
            });
        }
        let mut injected = poison.injected.clone();
        injected.remove(first, end - first);
        if injected != poison.injected {
            poison.sidecar.store(&injected)?;
            poison.injected = injected;
            poison.rebuild();
        }
        self.swap_granules(poison, offset, len)
    }

    fn store_locked(
        &self,
        poison: &Poison,
        offset: u64,
        len: u64,
        flushed: bool,
        mut op: impl FnMut(*mut u8, usize, usize) -> bool,
    ) -> Result<bool> {
        let mut tracker = self.tracker.as_ref().map(|t| t.lock());
        if let Some(state) = tracker.as_mut() {
            state.note_store(offset, len, |off, buf| self.read_raw(poison, off, buf));
        }
        let mut fenced = true;
        self.for_each_segment(poison, offset, len, |ptr, at, n| {
            fenced &= op(ptr, at, n);
            if flushed && self.msync {
                msync(ptr, n);
            }
        })?;
        if flushed {
            if let Some(state) = tracker.as_mut() {
                state.note_flush(offset, len);
            }
        }
        Ok(fenced && len > 0)
    }

    fn flush_checked(&self, poison: &Poison, offset: u64, len: u64) -> Result<()> {
        let flush = self.writer.flush;
        self.for_each_segment(poison, offset, len, |ptr, _, n| {
            // SAFETY: the segment is mapped for `n` bytes and the instruction
            // was detected on this CPU.
            unsafe { flush.flush_range(ptr, n) };
            if self.msync {
                msync(ptr, n);
            }
        })?;
        if let Some(tracker) = &self.tracker {
            tracker.lock().note_flush(offset, len);
        }
        Ok(())
    }

    /// Copy device bytes into `buf` whatever the poison (the emulation keeps
    /// the bytes; only the mapping of their page is withdrawn).
    fn read_raw(&self, poison: &Poison, offset: u64, buf: &mut [u8]) {
        let dst = buf.as_mut_ptr();
        let result = self.for_each_segment(poison, offset, buf.len() as u64, |src, at, n| {
            // SAFETY: the segment is mapped for `n` bytes and `buf` has room
            // for them at `at`.
            unsafe { std::ptr::copy_nonoverlapping(src, dst.add(at), n) }
        });
        if result.is_err() {
            // A window could not be mapped (out of address space): give
            // zeros rather than stale buffer contents.
            buf.fill(0);
        }
    }

    /// Whether `[offset, offset + len)` lies in a granule that holds poison.
    fn touches_poison(&self, poison: &Poison, offset: u64, len: u64) -> bool {
        if poison.all.is_empty() || len == 0 {
            return false;
        }
        let g = self.backing.granule;
        let start = offset / g * g;
        let end = (offset + len).div_ceil(g) * g;
        poison.all.first_in(start / SECTOR, end / SECTOR).is_some()
    }

    /// Call `f(ptr, position, len)` for consecutive pieces of the range: runs
    /// of clean granules through the device mapping, each poisoned granule
    /// through a window.
    fn for_each_segment(
        &self,
        poison: &Poison,
        offset: u64,
        len: u64,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<()> {
        let base = self.map.base();
        if !self.touches_poison(poison, offset, len) {
            if len > 0 {
                // SAFETY: the range was bounds-checked against the mapping.
                f(unsafe { base.add(offset as usize) }, 0, len as usize);
            }
            return Ok(());
        }
        let g = self.backing.granule;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let granule = at / g * g;
            if self.touches_poison(poison, granule, g) {
                let seg_end = (granule + g).min(end);
                let window = Window::map(self.file.as_fd(), granule, g as usize, !self.read_only)
                    .map_err(|e| {
                    Error::io(&self.path, "map a window over a poisoned page", e)
                })?;
                // SAFETY: `at - granule < g`, inside the window.
                let ptr = unsafe { window.ptr().add((at - granule) as usize) };
                f(ptr, (at - offset) as usize, (seg_end - at) as usize);
                at = seg_end;
            } else {
                let mut seg_end = (granule + g).min(end);
                while seg_end < end && !self.touches_poison(poison, seg_end, g) {
                    seg_end = (seg_end + g).min(end);
                }
                // SAFETY: [at, seg_end) was bounds-checked and is mapped.
                let ptr = unsafe { base.add(at as usize) };
                f(ptr, (at - offset) as usize, (seg_end - at) as usize);
                at = seg_end;
            }
        }
        Ok(())
    }

    /// Make every granule of `[offset, offset + len)` match the list: poisoned
    /// ones raise `SIGBUS`, clean ones map the device. Called with the poison
    /// lock held for writing, so no API access is in flight.
    fn swap_granules(&self, poison: &Poison, offset: u64, len: u64) -> Result<()> {
        let g = self.backing.granule;
        let mut granule = offset / g * g;
        while granule < offset + len {
            let bad = self.touches_poison(poison, granule, g);
            // SAFETY: the granule lies inside the mapping; the poison lock is
            // held for writing, so no API call is using these pages, and the
            // raw-pointer contract (`as_ptr`) warns that they may vanish.
            let swapped = unsafe {
                if bad {
                    self.map.replace_with_sigbus(
                        granule as usize,
                        g as usize,
                        poison.sigbus_file.as_fd(),
                    )
                } else {
                    self.map
                        .restore(granule as usize, g as usize, self.file.as_fd())
                }
            };
            swapped.map_err(|e| Error::io(&self.path, "remap a poisoned page", e))?;
            granule += g;
        }
        Ok(())
    }

    /// The next range of data (not a hole) in `[from, end)` of an emulated
    /// image, clipped to `end`; a device-dax is all data.
    fn next_data(&self, from: u64, end: u64) -> Option<(u64, u64)> {
        if !matches!(self.backing.kind, DeviceKind::Emulated) {
            return Some((from, end));
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek only reads the file's extent map.
        let data = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data past `from`. Any other error: read it all.
            return (std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO))
                .then_some((from, end));
        }
        let data = data as u64;
        if data >= end {
            return None;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        Some((data, hole))
    }
}

// The filesystem shares one device among all its threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Device>();
};

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn canonical(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| Error::io(path, "resolve the path", e))
}

/// `msync` the pages that hold `[ptr, ptr + len)`.
fn msync(ptr: *mut u8, len: usize) {
    let page = 4096usize;
    let start = ptr as usize & !(page - 1);
    let end = ptr as usize + len;
    // SAFETY: the pages lie in one of our shared mappings (the device or a
    // window), which `msync` only writes back.
    unsafe { libc::msync(start as *mut libc::c_void, end - start, libc::MS_SYNC) };
}

/// The kernel's badblocks of a device-dax, translated to device sectors.
/// Unreadable or absent lists give an empty one.
fn read_kernel_badblocks(backing: &Backing, sectors: u64) -> BadBlocks {
    let mut list = BadBlocks::default();
    let Some((file, start)) = &backing.kernel_badblocks else {
        return list;
    };
    let Ok(text) = std::fs::read_to_string(file) else {
        return list;
    };
    for line in text.lines() {
        let mut words = line.split_whitespace().map(|w| w.parse::<u64>());
        if let (Some(Ok(first)), Some(Ok(count))) = (words.next(), words.next()) {
            let s = first.max(*start);
            let e = (first + count).min(start + sectors);
            if s < e {
                list.insert(s - start, e - s);
            }
        }
    }
    list
}
