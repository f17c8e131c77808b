//! The one error type of the `pmem` crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong with a device. Each variant names the cause and,
/// where there is one, the file it concerns, so that its `Display` is a complete
/// one-line message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device size that is not allowed.
    #[error(
        "device size {size} bytes is not allowed: a device must be a multiple of 2 MiB, \
         at least 16 MiB and at most 64 TiB (for example 16M, 512M, 1G)"
    )]
    InvalidSize {
        /// The size that was asked for, in bytes.
        size: u64,
    },

    /// A system call on a file failed.
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        /// The file the call was about.
        path: PathBuf,
        /// What was being done, as a verb phrase ("open", "map the device").
        op: &'static str,
        /// The operating system's error.
        source: io::Error,
    },

    /// The filesystem holding an emulated device has no room to back a
    /// range of it.
    #[error(
        "{}: the filesystem holding the device is full: no room to back {len} bytes at \
         {offset:#x} of it",
        path.display()
    )]
    NoSpace {
        /// The device.
        path: PathBuf,
        /// The first byte of the range that could not be backed.
        offset: u64,
        /// Its length.
        len: u64,
    },

    /// `create` found a file already there.
    #[error("{}: already exists; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// The file that exists.
        path: PathBuf,
    },

    /// The file exists but cannot be a pmem device.
    #[error("{}: not a pmem device: {reason}", path.display())]
    NotADevice {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },

    /// Somebody else holds the device.
    #[error("{}: device is in use {}", path.display(), holder_text(*holder))]
    Busy {
        /// The device.
        path: PathBuf,
        /// The pid of the process that holds it, when it could be found.
        holder: Option<u32>,
    },

    /// An offset and length that reach outside the device.
    #[error("range {offset:#x}+{len:#x} is outside the device ({size:#x} bytes)")]
    OutOfBounds {
        /// First byte of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the device.
        size: u64,
    },

    /// A range that had to be aligned and was not.
    #[error("range {offset:#x}+{len:#x} must be aligned to {align} bytes")]
    Unaligned {
        /// First byte of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The required alignment.
        align: u64,
    },

    /// A write that covers only part of a poisoned sector: the sector cannot be
    /// cleared without the rest of its contents, so the write is refused, as
    /// Linux's pmem driver refuses it.
    #[error(
        "media error: the write covers only part of the poisoned sector at device offset \
         {sector_offset:#x}; write the whole 512-byte sector to clear it"
    )]
    PartialPoisonWrite {
        /// Device offset of the poisoned sector.
        sector_offset: u64,
    },

    /// A read that reached poison (for calls that have no short-read form).
    #[error("media error: poisoned sector at device offset {offset:#x}")]
    Poisoned {
        /// Device offset of the first poisoned sector that was reached.
        offset: u64,
    },

    /// The list of poisoned sectors kept beside an emulated device is unreadable.
    #[error("{}: line {line}: {reason}", path.display())]
    BadblocksFile {
        /// The badblocks file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },

    /// A crash image was asked to keep a line that has no pending store.
    #[error("cache line at device offset {offset:#x} has no pending store")]
    NotPending {
        /// Device offset of the line.
        offset: u64,
    },

    /// A change that would write the image of a device opened read-only.
    #[error(
        "{}: opened read-only: {what} would write the image (other changes stay in this \
         process's memory)",
        path.display()
    )]
    ReadOnly {
        /// The device.
        path: PathBuf,
        /// What was refused.
        what: &'static str,
    },

    /// The operation is not possible on this kind of device.
    #[error("{}: {what}", path.display())]
    Unsupported {
        /// The device.
        path: PathBuf,
        /// What cannot be done, and what to do instead.
        what: String,
    },
}

fn holder_text(holder: Option<u32>) -> String {
    match holder {
        Some(pid) if pid == std::process::id() => {
            format!("by this process (pid {pid}), through another open handle")
        }
        Some(pid) => format!("by process {pid}"),
        None => "by another open handle (holder's pid unknown)".to_string(),
    }
}

/// The `pmem` crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
