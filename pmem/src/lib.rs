//! `pmem`: a persistent-memory device, emulated by a file or real (`/dev/dax`).
//!
//! A [`Device`] maps the whole namespace `MAP_SHARED` at a 2 MiB-aligned
//! address, so that every 2 MiB-aligned device offset can be mapped with a PMD.
//! It offers, by device offset and bounds-checked:
//!
//! * persistence, as PMDK's libpmem does it: [`Device::flush`] (with `clwb`,
//!   else `clflushopt`, else `clflush`, chosen at run time), [`Device::drain`]
//!   (a store fence), [`Device::persist`], and copies and fills that use
//!   non-temporal stores from 256 bytes up ([`Device::memcpy_persist`],
//!   [`Device::memset_persist`]). How much that guarantees depends on the
//!   backing, which the device detects and explains ([`PersistenceMode`]): DAX
//!   (`MAP_SYNC` accepted), memory (tmpfs, hugetlbfs), or a disk filesystem,
//!   where `persist` must also `msync` unless the device was opened in fast mode;
//! * poison, in 512-byte sectors as Linux's badblocks: [`Device::inject`],
//!   [`Device::clear`], [`Device::badblocks`], [`Device::scrub`], and
//!   [`Device::read_mcsafe`], which stops at the first poisoned sector as
//!   `copy_mc_to_kernel` does. A direct load from a poisoned page raises
//!   `SIGBUS`, as a machine check would. An emulated device keeps its list in
//!   `IMAGE.badblocks` beside the image ([`badblocks`]);
//! * crash tracking for tests ([`crash`]): the images a power failure could
//!   leave at any fence;
//! * exclusive ownership: a second open, from any process, fails with
//!   [`Error::Busy`] naming the holder's pid.
//!
//! ```no_run
//! use pmem::{Device, DeviceOptions};
//! let dev = Device::create("/dev/shm/pmem0.img", 64 << 20, &DeviceOptions::new())?;
//! dev.memcpy_persist(4096, b"durable")?;
//! dev.inject(8192, 512)?;
//! let mut buf = [0u8; 1024];
//! let read = dev.read_mcsafe(7680, &mut buf)?;
//! assert_eq!((read.copied, read.poison), (512, Some(8192)));
//! # Ok::<(), pmem::Error>(())
//! ```

#![warn(missing_docs)]

mod backing;
pub mod badblocks;
mod copy;
pub mod cpu;
pub mod crash;
mod device;
mod error;
mod lock;
mod mapping;

pub use backing::{huge_pages_at, DeviceKind, HugePages, Persistence, PersistenceMode};
pub use badblocks::{BadRange, SECTOR};
pub use copy::{MovntKernel, Writer, MOVNT_THRESHOLD};
pub use cpu::{FlushInstruction, CACHE_LINE};
pub use crash::{CrashPoint, FenceHook, PendingLine};
pub use device::{
    validate_size, Device, DeviceInfo, DeviceOptions, McsafeRead, Reserver, ScrubReport, MAX_SIZE,
    MIN_SIZE, SIZE_ALIGN,
};
pub use error::{Error, Result};
pub use lock::{device_holder, device_in_use};
pub use mapping::{sigbus_file, Reservation, HUGE_PAGE};
