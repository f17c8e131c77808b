//! Crash tracking: which cache lines a power failure could still lose.
//!
//! A device opened with crash tracking records every store made through the
//! `pmem` API (stores through raw pointers are not seen). x86's rule decides
//! what is durable: a store is durable only once its line has been flushed
//! (or written with non-temporal stores) *and* a fence has followed. So each
//! cache line is in one of three states:
//!
//! * durable: nothing pending; not tracked;
//! * stored: written since it was last durable, not flushed since;
//! * flushed: written and then flushed, waiting for a fence.
//!
//! A line becomes tracked on its first store, when its durable contents (the
//! bytes before that store) are saved. At a fence, every flushed line becomes
//! durable; stored lines stay pending. A power failure at any moment leaves
//! each pending line either durable (old) or as last written (new), in any
//! combination: a [`CrashPoint`] produces those images. (Real hardware can also
//! persist an intermediate version of a line written twice; like Chipmunk's
//! model, this tracker offers only the two ends.)
//!
//! At each fence, just before the flushed lines become durable, the tracker
//! calls the registered hook with the crash point of that moment, so a test can
//! enumerate the images a crash there could leave.

use crate::cpu::CACHE_LINE;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

const LINE: u64 = CACHE_LINE as u64;

/// A hook called at every fence of a crash-tracking device.
pub type FenceHook = Box<dyn FnMut(&CrashPoint<'_>) + Send>;

/// A cache line whose latest contents a crash could lose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingLine {
    /// Device offset of the line (a multiple of 64).
    pub offset: u64,
    /// Whether the line was flushed after its last store (it becomes durable
    /// at the next fence).
    pub flushed: bool,
}

struct Pending {
    durable: [u8; CACHE_LINE],
    flushed: bool,
}

#[derive(Default)]
pub(crate) struct TrackerState {
    lines: BTreeMap<u64, Pending>,
    fences: u64,
    hook: Option<FenceHook>,
}

/// The tracker of one device.
#[derive(Default)]
pub(crate) struct CrashTracker {
    state: Mutex<TrackerState>,
}

impl CrashTracker {
    pub(crate) fn lock(&self) -> MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TrackerState {
    /// Note a store to `[offset, offset + len)`, before it happens. `read`
    /// fills a buffer with the device's current bytes at an offset.
    pub(crate) fn note_store(
        &mut self,
        offset: u64,
        len: u64,
        mut read: impl FnMut(u64, &mut [u8]),
    ) {
        for line in lines(offset, len) {
            let pending = self.lines.entry(line).or_insert_with(|| {
                let mut durable = [0u8; CACHE_LINE];
                read(line, &mut durable);
                Pending {
                    durable,
                    flushed: false,
                }
            });
            pending.flushed = false;
        }
    }

    /// Note a flush (or non-temporal write) of `[offset, offset + len)`.
    pub(crate) fn note_flush(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset & !(LINE - 1);
        for (_, pending) in self.lines.range_mut(first..offset + len) {
            pending.flushed = true;
        }
    }

    /// A fence: show the hook the crash point, then retire flushed lines.
    pub(crate) fn fence(&mut self, size: u64, current: &dyn Fn(u64, &mut [u8])) {
        if let Some(mut hook) = self.hook.take() {
            hook(&self.point(size, current));
            self.hook = Some(hook);
        }
        self.lines.retain(|_, p| !p.flushed);
        self.fences += 1;
    }

    pub(crate) fn set_hook(&mut self, hook: Option<FenceHook>) {
        self.hook = hook;
    }

    pub(crate) fn point<'a>(
        &'a self,
        size: u64,
        current: &'a dyn Fn(u64, &mut [u8]),
    ) -> CrashPoint<'a> {
        CrashPoint {
            state: self,
            size,
            current,
        }
    }
}

fn lines(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = offset & !(LINE - 1);
    let end = if len == 0 { first } else { offset + len };
    (first..end).step_by(CACHE_LINE)
}

/// A moment at which power could fail, and the images it could leave.
pub struct CrashPoint<'a> {
    state: &'a TrackerState,
    size: u64,
    /// Reads the device's current bytes.
    current: &'a dyn Fn(u64, &mut [u8]),
}

impl CrashPoint<'_> {
    /// How many fences completed before this point.
    pub fn fences(&self) -> u64 {
        self.state.fences
    }

    /// The lines a crash here could lose, in device order.
    pub fn pending(&self) -> Vec<PendingLine> {
        self.state
            .lines
            .iter()
            .map(|(&offset, p)| PendingLine {
                offset,
                flushed: p.flushed,
            })
            .collect()
    }

    /// The device image a crash here leaves when exactly the pending lines at
    /// the offsets in `persisted` reached the media and every other pending
    /// line was lost. `persisted` may only name pending lines.
    pub fn image(&self, persisted: &[u64]) -> Result<Vec<u8>> {
        let mut image = Vec::new();
        self.image_into(persisted, &mut image)?;
        Ok(image)
    }

    /// [`image`](Self::image), into `image` (resized to the device's size):
    /// a buffer used again costs no allocation and no page faults, which
    /// is most of the cost of an image of a large device.
    pub fn image_into(&self, persisted: &[u64], image: &mut Vec<u8>) -> Result<()> {
        for &offset in persisted {
            if !self.state.lines.contains_key(&offset) {
                return Err(Error::NotPending { offset });
            }
        }
        image.resize(self.size as usize, 0);
        const CHUNK: usize = 1 << 20;
        for (i, chunk) in image.chunks_mut(CHUNK).enumerate() {
            (self.current)((i * CHUNK) as u64, chunk);
        }
        let persisted: std::collections::HashSet<u64> = persisted.iter().copied().collect();
        for (&offset, pending) in &self.state.lines {
            if !persisted.contains(&offset) {
                let at = offset as usize;
                image[at..at + CACHE_LINE].copy_from_slice(&pending.durable);
            }
        }
        Ok(())
    }

    /// Write [`image`](Self::image) to a new emulated device file at `path`,
    /// sparsely: pages of zeros are left as holes.
    pub fn write_image(&self, persisted: &[u64], path: &Path) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let image = self.image(persisted)?;
        let io = |e| Error::io(path, "write the crash image", e);
        let file = std::fs::File::create(path).map_err(io)?;
        file.set_len(image.len() as u64).map_err(io)?;
        const PAGE: usize = 4096;
        for (i, page) in image.chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                file.write_all_at(page, (i * PAGE) as u64).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Turn the device file at `path`, written by
    /// [`write_image`](Self::write_image) at this point (with any
    /// `persisted`), into the image `persisted` leaves: only the pending
    /// lines are written. A point with many subsets to check costs one
    /// whole image and then a few lines per subset.
    pub fn rewrite_image(&self, persisted: &[u64], path: &Path) -> Result<()> {
        use std::os::unix::fs::FileExt;
        for &offset in persisted {
            if !self.state.lines.contains_key(&offset) {
                return Err(Error::NotPending { offset });
            }
        }
        let io = |e| Error::io(path, "rewrite the crash image", e);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut line = [0u8; CACHE_LINE];
        for (&offset, pending) in &self.state.lines {
            match persisted.contains(&offset) {
                true => (self.current)(offset, &mut line),
                false => line = pending.durable,
            }
            file.write_all_at(&line, offset).map_err(io)?;
        }
        Ok(())
    }
}
