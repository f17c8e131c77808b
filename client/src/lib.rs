//! Reaching the daemon of a daxfs mount: the mount table ([`mounts`]), the
//! control socket and who may use it ([`socket`]), and the layout-lease
//! protocol a client that maps device pages itself speaks over it
//! ([`lease`]). Used by the `daxfs` command and the preload library.

pub mod lease;
pub mod mounts;
pub mod socket;
