//! The filesystem's error type, with the errno each cause maps to.

use std::fmt;

/// What went wrong in a filesystem call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such file or directory (`ENOENT`).
    #[error("no such file or directory")]
    NotFound,
    /// The name exists already (`EEXIST`).
    #[error("file exists")]
    Exists,
    /// A directory is not empty (`ENOTEMPTY`).
    #[error("directory not empty")]
    NotEmpty,
    /// A path component or target is not a directory (`ENOTDIR`).
    #[error("not a directory")]
    NotDir,
    /// A directory where a file was needed (`EISDIR`).
    #[error("is a directory")]
    IsDir,
    /// A name longer than 255 bytes (`ENAMETOOLONG`).
    #[error("file name too long")]
    NameTooLong,
    /// No free blocks or inodes (`ENOSPC`).
    #[error("no space left on device")]
    NoSpace,
    /// Past the largest file the format holds (`EFBIG`).
    #[error("file too large: files end at 2^63 - 1 bytes")]
    FileTooBig,
    /// A bad argument (`EINVAL`), with what was wrong.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// Too many links to one inode (`EMLINK`).
    #[error("too many links")]
    TooManyLinks,
    /// No such extended attribute (`ENODATA`).
    #[error("no such attribute")]
    NoAttr,
    /// The value or list does not fit the caller's buffer (`ERANGE`).
    #[error("result too large")]
    Range,
    /// The operation is not permitted on this file (`EPERM`), with why.
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    /// The operation is not supported (`EOPNOTSUPP`).
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// A read reached poison before any byte could be read, or a write
    /// covered part of a poisoned sector (`EIO`).
    #[error("input/output error: media error at device offset {offset:#x}")]
    MediaError {
        /// Device offset of the poison.
        offset: u64,
    },
    /// A metadata structure is corrupt or poisoned (`EIO`): the filesystem
    /// refuses to act on it.
    #[error("{structure} at device offset {offset:#x} is damaged: {detail}")]
    Corrupt {
        /// What it is ("superblock", "inode 12", "directory block").
        structure: String,
        /// Where it is.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The filesystem is busy (`EBUSY`): what is still in use.
    #[error("filesystem is busy: {0}")]
    Busy(String),
    /// A call that frees blocks found the file mapped after it looked
    /// (`EBUSY`); it runs again, breaking the mappings first, so no public
    /// call returns it.
    #[error("the file was mapped meanwhile")]
    MappedMeanwhile,
    /// The layout of the range is being recalled (`EAGAIN`): a break of
    /// the file's mappings is running. A fault drops its locks and runs
    /// again (see `dax`), so no mapping sees it.
    #[error("the layout is being recalled")]
    Recalled,
    /// The filesystem is marked as needing a check (`EUCLEAN`): damage was
    /// found (a damaged journal); mount refuses until `fsck --repair` has
    /// run.
    #[error("the filesystem needs a check: {0}")]
    NeedsCheck(String),
    /// The filesystem was unmounted: no call can be served any more.
    #[error("the filesystem is unmounted")]
    Unmounted,
    /// The device layer failed.
    #[error(transparent)]
    Device(#[from] pmem::Error),
}

impl Error {
    /// The errno a FUSE reply or a C caller would see.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc::ENOENT,
            Error::Exists => libc::EEXIST,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::NoSpace => libc::ENOSPC,
            Error::FileTooBig => libc::EFBIG,
            Error::Invalid(_) => libc::EINVAL,
            Error::TooManyLinks => libc::EMLINK,
            Error::NoAttr => libc::ENODATA,
            Error::Range => libc::ERANGE,
            Error::NotPermitted(_) => libc::EPERM,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::MediaError { .. } | Error::Corrupt { .. } => libc::EIO,
            Error::Busy(_) | Error::MappedMeanwhile => libc::EBUSY,
            Error::Recalled => libc::EAGAIN,
            Error::NeedsCheck(_) => libc::EUCLEAN,
            Error::Unmounted => libc::EIO,
            Error::Device(pmem::Error::Poisoned { .. })
            | Error::Device(pmem::Error::PartialPoisonWrite { .. }) => libc::EIO,
            Error::Device(_) => libc::EIO,
        }
    }

    pub(crate) fn corrupt(
        structure: impl fmt::Display,
        offset: u64,
        detail: impl fmt::Display,
    ) -> Error {
        Error::Corrupt {
            structure: structure.to_string(),
            offset,
            detail: detail.to_string(),
        }
    }
}

/// The filesystem's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
