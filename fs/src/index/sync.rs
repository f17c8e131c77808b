//! The synchronisation primitives of the wait protocol: std's, or loom's when
//! the crate is built with `--cfg loom` to model-check that protocol.

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{fence, AtomicU64, AtomicUsize},
    Condvar, Mutex,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{fence, AtomicU64, AtomicUsize},
    Condvar, Mutex,
};
