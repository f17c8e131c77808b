//! daxfs: a persistent-memory DAX filesystem in userspace.
//!
//! The filesystem is built in layers on the [`pmem`] device crate (see the
//! workspace README and DESIGN.md). This crate is where the format, the
//! allocator, the journal, the namespace, the DAX entry index and the FUSE
//! adapter will live; for now it re-exports the device layer that they build on.

pub use pmem;
