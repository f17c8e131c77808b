//! Reaching the daemon of a daxfs mount: the mount table ([`mounts`]), the
//! control socket and who may use it ([`socket`]), and the layout-lease
//! protocol a client that maps device pages itself speaks over it
//! ([`lease`]); where the default image lives ([`images`]); the FIEMAP
//! answer for daxfs files, which the kernel does not ask FUSE for
//! ([`fiemap`]); and the fault trace's lines ([`trace`]). Used by the `daxfs` command, the preload library and the
//! benchmarks.

pub mod fiemap;
pub mod images;
pub mod lease;
pub mod mounts;
pub mod socket;
pub mod trace;
