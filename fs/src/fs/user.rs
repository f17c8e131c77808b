//! Memory the caller passes in (data, names, attribute values) may lie in
//! a DAX mapping of ours, whose faults take the filesystem's locks (see
//! `dax`): touching it under those locks would make the thread wait for
//! itself. So what a call reads from caller memory is copied first, with
//! no lock held ([`unmapped`]), and what `read` stores into it goes to
//! memory of our own first and is copied out once the lock is released.
//! Faulting such a buffer in beforehand (Linux's `fault_in_readable`) is
//! not enough: another thread may write-protect or unmap a page between
//! that fault and the copy, and the copy would fault under the lock.
//!
//! The rule is checked: every hold of the state lock, of the table of
//! files with DAX state, of a file's invalidate lock (shared or exclusive)
//! and of an entry lock outside the fault routine counts itself in a
//! thread-local ([`Held`], [`Counted`]), and in debug
//! builds the fault handler asserts that its thread holds none, so a path
//! that breaks the rule aborts with a message in the tests instead of
//! hanging.

use std::borrow::Cow;
use std::cell::Cell;
use std::ffi::OsString;
use std::ops::{Deref, DerefMut};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, MutexGuard};
use std::time::Duration;

/// `bytes`, or, if any of them lie in a DAX mapping, a copy made now.
pub(super) fn unmapped(bytes: &[u8]) -> Cow<'_, [u8]> {
    match super::dax::overlaps_mapping(bytes) {
        true => Cow::Owned(bytes.to_vec()),
        false => Cow::Borrowed(bytes),
    }
}

/// [`unmapped`] for a path.
pub(super) fn unmapped_path(path: &Path) -> Cow<'_, Path> {
    match unmapped(path.as_os_str().as_bytes()) {
        Cow::Borrowed(_) => Cow::Borrowed(path),
        Cow::Owned(bytes) => Cow::Owned(PathBuf::from(OsString::from_vec(bytes))),
    }
}

/// The most a read into a mapping stages in memory of our own at a time.
pub(super) const BOUNCE: usize = 1 << 20;

thread_local! {
    /// Filesystem locks this thread holds (counted in debug builds only,
    /// where the fault handler checks it).
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// One hold of a filesystem lock by this thread, for as long as it lives.
pub(super) struct Held(());

impl Held {
    pub(super) fn new() -> Held {
        if cfg!(debug_assertions) {
            HELD.with(|h| h.set(h.get() + 1));
        }
        Held(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if cfg!(debug_assertions) {
            HELD.with(|h| h.set(h.get() - 1));
        }
    }
}

/// A lock guard whose hold counts as one of this thread's ([`Held`]).
pub(super) struct Counted<G> {
    guard: G,
    _held: Held,
}

impl<G> Counted<G> {
    pub(super) fn new(guard: G) -> Counted<G> {
        Counted {
            guard,
            _held: Held::new(),
        }
    }
}

impl<'a, T> Counted<MutexGuard<'a, T>> {
    /// Release the lock until `condvar` is notified or `timeout` passes.
    pub(super) fn wait_timeout(mut self, condvar: &Condvar, timeout: Duration) -> Self {
        self.guard = condvar
            .wait_timeout(self.guard, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        self
    }
}

impl<G: Deref> Deref for Counted<G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: DerefMut> DerefMut for Counted<G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

/// How many filesystem locks this thread holds (0 in release builds).
pub(super) fn locks_held() -> u32 {
    HELD.with(Cell::get)
}
