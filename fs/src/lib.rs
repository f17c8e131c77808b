//! daxfs: a persistent-memory DAX filesystem in userspace.
//!
//! Built in layers on the [`pmem`] device crate (see the workspace README and
//! DESIGN.md):
//!
//! * [`format`]: the on-media format, described next to the code that writes it;
//! * [`journal`]: the redo journal (revoke records, checkpointed as it goes,
//!   a read-only scan that says why the log ends) that makes every metadata
//!   change atomic;
//! * `alloc`: the 2 MiB-aware block allocator, and the bitmap's checksums;
//! * [`fsck`]: a check that writes nothing (a private mapping) and goes on
//!   past damage, naming it, and repairs as e2fsck makes them;
//! * [`Fs`]: the filesystem and its library API (inode- and path-based calls),
//!   with DAX mappings ([`Fs::mmap`]), pins for direct I/O against calls that
//!   free blocks ([`Fs::pin`]) and memory-failure handling
//!   ([`Fs::memory_failure`]);
//! * [`index`]: the per-file multi-order entry index with entry locks that the
//!   DAX fault, writeback and memory-failure paths use.

mod alloc;
mod error;
pub mod format;
mod fs;
pub mod index;
pub mod journal;

pub use error::{Error, Result};
pub use fs::{
    from_xflags, fsck, to_xflags, Atime, Attr, BusSignal, CacheUsage, CreateOptions, DaxStats,
    DirEntry, FailureHandler, Fallback, FileExtent, FileKind, Fs, FsckReport, Handle, Hold, Ino,
    MapOptions, Mapping, MemoryFailure, Owner, Pin, Problem, RenameFlags, Seek, SetAttr, Shrunk,
    StatFs, Timestamp, DEFAULT_CACHE_BUDGET, DEFAULT_LAYOUT_TIMEOUT, ROOT,
};
pub use pmem;

/// DAX mappings made outside the filesystem's process: what a client that
/// maps a file's device pages itself (the preload library) builds on. It
/// brings a [`Layout`](dax::Layout) of the file (over a channel to the
/// filesystem's process) and keeps a [`FileDax`](dax::FileDax) per file;
/// [`map`](dax::map) does the rest, with the same fault routine, pieces and
/// signal handling as [`Fs::mmap`].
pub mod dax {
    pub use crate::fs::{
        early_notice, map, map_at, Blocks, Breaking, DaxCounters, DevicePages, FaultEvent,
        FaultResult, FaultSize, FileDax, Layout, MapOptions, Mapping, Recall, RecallKind,
        TraceSink,
    };
}
