//! daxfs: a persistent-memory DAX filesystem in userspace.
//!
//! The filesystem is built in layers on the [`pmem`] device crate (see the
//! workspace README and DESIGN.md). So far this crate holds the layer with no
//! dependency on the rest: [`index`], the per-file multi-order entry index with
//! entry locks that the DAX fault, writeback and memory-failure paths use.

pub mod index;

pub use pmem;
