//! Break layouts: pins of device pages against calls that free blocks.
//!
//! A direct-I/O consumer (a program doing DMA or O_DIRECT-style transfers
//! out of a file's device pages) pins the pages it uses with [`Fs::pin`], as
//! `get_user_pages` does, and works on the device ranges the [`Pin`] lists
//! until it drops it. A call that frees or moves blocks (truncate, hole
//! punch, `O_TRUNC`) first unmaps the range from every DAX mapping, then
//! waits until no page of the range is pinned, and only then frees
//! (Linux's `dax_layout_busy_page_range` and `ext4_break_layouts`). The wait
//! ends with an error that frees nothing after the layout timeout
//! ([`Fs::set_layout_timeout`]) or when [`Fs::cancel_layout_breaks`] is
//! called. A new pin on a file whose layout is being broken waits until the
//! break is done: pins take the file's invalidate lock shared, as faults
//! do, and a break holds it exclusive from the unmap to the commit.
//!
//! So a pinned block is never freed or reused while pinned: no file can
//! read another file's data through a pin, and nobody reads freed blocks.
//! The library's own `read` and `write` copy under the state lock, which
//! no call that frees blocks can take meanwhile, so they need no pin.

use super::dax::FileDax;
use super::{FileExtent, Fs, Ino, InodeRef};
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a call that frees pinned blocks waits by default.
pub const DEFAULT_LAYOUT_TIMEOUT: Duration = Duration::from_secs(30);

const PAGE: u64 = 4096;

/// What a break of a leased range tells the lease's holder (see
/// [`Fs::lease`]); whether the holder was told and will give the lease
/// back (the break then waits for that, up to the layout timeout). Called
/// with the file's invalidate lock held exclusive, so it must not wait
/// itself, except for [`RecallKind::Poisoned`], which is called with no
/// lock held and may wait (up to the layout timeout) until the holder has
/// made the page inaccessible, so that memory failure is over for every
/// process when it returns, as Linux's is.
pub type Recall = Arc<dyn Fn(RecallKind) -> bool + Send + Sync>;

/// Why a lease is recalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecallKind {
    /// Blocks of the range are about to be freed or moved: drop the lease.
    Freeing,
    /// Holes of the range are being given blocks: pages shown as holes
    /// must fault again (the fill waits until the lease is given back, so
    /// that no process shows a stale zero page once it returns).
    FillingHoles,
    /// File page `page` of the range holds poison now: it must become
    /// inaccessible (an access raises `SIGBUS`); nothing waits.
    Poisoned { page: u64 },
}

/// One pin or lease of a file's pages, as its file's DAX state lists it.
pub(super) struct PinSlot {
    id: u64,
    pages: (u64, u64),
    recall: Option<Recall>,
}

impl PinSlot {
    fn overlaps(&self, first: u64, end: u64) -> bool {
        self.pages.0 < end && first < self.pages.1
    }
}

/// Device pages of a file pinned for direct I/O (see the module docs), or
/// leased to a client that maps them ([`Fs::lease`]). Unpinned on drop.
pub struct Pin {
    fs: Fs,
    ino: Ino,
    dax: Arc<FileDax>,
    /// The inode stays in memory while pinned (dropped after the rest).
    _hold: InodeRef,
    id: u64,
    /// The pinned file pages.
    pages: (u64, u64),
    extents: Vec<FileExtent>,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin")
            .field("ino", &self.ino)
            .field("pages", &self.pages)
            .field("extents", &self.extents)
            .finish()
    }
}

impl Pin {
    /// The pinned blocks: the parts of the range that have blocks, clipped
    /// to it, in file order (holes are not listed).
    pub fn extents(&self) -> &[FileExtent] {
        &self.extents
    }

    /// Read pinned data at file offset `offset` straight from the device,
    /// as a DMA engine would (poison-aware: a media error is `EIO`). The
    /// range must lie in the pinned blocks.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let e = self
                .extents
                .iter()
                .find(|e| (e.file_offset..e.file_offset + e.len).contains(&at))
                .ok_or(Error::Invalid("read outside the pinned blocks"))?;
            let n = ((e.file_offset + e.len - at) as usize).min(buf.len() - done);
            let got = self.fs.core.dev.read_mcsafe(
                e.device_offset + (at - e.file_offset),
                &mut buf[done..done + n],
            )?;
            if let Some(offset) = got.poison {
                return Err(Error::MediaError { offset });
            }
            done += n;
        }
        Ok(())
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        {
            let mut pins = self.dax.pins.lock().unwrap_or_else(|e| e.into_inner());
            pins.retain(|p| p.id != self.id);
        }
        self.dax.unpinned.notify_all();
        self.fs.dax_release(&self.dax, self.ino);
    }
}

impl Fs {
    /// Pin the device pages behind `[offset, offset + len)` of regular file
    /// `ino` for direct I/O: until the pin is dropped, no call frees or
    /// moves them (it waits), and unmount is refused.
    pub fn pin(&self, ino: Ino, offset: u64, len: u64) -> Result<Pin> {
        self.pin_with(ino, offset, len, None)
    }

    /// Lease the layout of `[offset, offset + len)` of regular file `ino`
    /// to a client that maps its device pages itself (in another process):
    /// a [`Pin`] whose holder is told (`recall`, which must not block) when
    /// a call is about to free or move its blocks, or fill its holes. A
    /// call that frees waits until the lease is dropped, as for a pin (and
    /// gives up with `EBUSY` after the layout timeout). A lease asked for
    /// while a break of the file runs is refused at once with
    /// [`Error::Recalled`], since the holder may be the one the break waits
    /// for: ask again once the recall is answered.
    pub fn lease(&self, ino: Ino, offset: u64, len: u64, recall: Recall) -> Result<Pin> {
        self.pin_with(ino, offset, len, Some(recall))
    }

    fn pin_with(&self, ino: Ino, offset: u64, len: u64, recall: Option<Recall>) -> Result<Pin> {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let end = offset
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::Invalid("bad pin range"))?;
        let pages = (offset / PAGE, end.div_ceil(PAGE));
        // The DAX state is made under the state lock, as for a mapping, so
        // that a call freeing blocks sees it when it checks.
        let (dax, hold) = {
            let mut st = self.lock()?;
            let inode = self.inode(&mut st, ino)?;
            if inode.kind() != libc::S_IFREG {
                return Err(Error::Invalid("only regular files can be pinned"));
            }
            (
                self.file_dax(&mut st, ino),
                InodeRef::take(self, &mut st, ino),
            )
        };
        // Made first, so that an error below unpins and drops the hold.
        let mut pin = Pin {
            fs: self.view(),
            ino,
            dax: Arc::clone(&dax),
            _hold: hold,
            id: IDS.fetch_add(1, Ordering::Relaxed),
            pages,
            extents: Vec::new(),
        };
        // Shared, as a fault: a pin waits while a break of this file is
        // running; a lease does not (see `lease`).
        let _shared = match recall {
            None => dax.shared(),
            Some(_) => dax.try_shared().ok_or(Error::Recalled)?,
        };
        dax.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(PinSlot {
                id: pin.id,
                pages,
                recall,
            });
        pin.extents = self
            .file_extents(ino)?
            .into_iter()
            .filter_map(|e| {
                let a = e.file_offset.max(offset);
                let b = (e.file_offset + e.len).min(end);
                (a < b).then(|| FileExtent {
                    file_offset: a,
                    device_offset: e.device_offset + (a - e.file_offset),
                    len: b - a,
                })
            })
            .collect();
        Ok(pin)
    }

    /// How long a call that must free pinned blocks waits for the pins to
    /// go before it gives up with `EBUSY` (and frees nothing).
    pub fn set_layout_timeout(&self, timeout: Duration) {
        let ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        self.core.layout_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// The layout timeout ([`set_layout_timeout`](Self::set_layout_timeout)).
    pub fn layout_timeout(&self) -> Duration {
        Duration::from_millis(self.core.layout_timeout_ms.load(Ordering::Relaxed))
    }

    /// How many calls are waiting for pins to go right now (a truncate or
    /// punch breaking the layout of a pinned range).
    pub fn layout_breaks_waiting(&self) -> u64 {
        self.core.layout_waiting.load(Ordering::Acquire)
    }

    /// Make every call waiting for pins give up now with `EBUSY` (freeing
    /// nothing), as a signal interrupts Linux's wait.
    pub fn cancel_layout_breaks(&self) {
        self.core.layout_cancel.fetch_add(1, Ordering::AcqRel);
        let files: Vec<Arc<FileDax>> = {
            let files = self.dax_table();
            files.values().cloned().collect()
        };
        for dax in files {
            // Taken so that a waiter between its check and its sleep
            // cannot miss the wake-up.
            drop(dax.pins.lock().unwrap_or_else(|e| e.into_inner()));
            dax.unpinned.notify_all();
        }
    }

    /// With the file's invalidate lock held exclusive and its range
    /// unmapped: tell the holders of leases of `[first, end)` why; the ids
    /// of the leases whose holders will give them back.
    pub(super) fn recall_leases(dax: &FileDax, first: u64, end: u64, why: RecallKind) -> Vec<u64> {
        let recalls: Vec<(u64, Recall)> = dax
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.overlaps(first, end))
            .filter_map(|p| Some((p.id, p.recall.clone()?)))
            .collect();
        recalls
            .into_iter()
            .filter_map(|(id, recall)| recall(why).then_some(id))
            .collect()
    }

    /// Wait (up to the layout timeout) until the leases `ids` are given
    /// back; whether they were.
    pub(super) fn wait_for_leases(&self, dax: &FileDax, ids: &[u64]) -> bool {
        self.wait_until_none(dax, |p| ids.contains(&p.id)).is_ok()
    }

    /// With the file's invalidate lock held exclusive and its range
    /// unmapped: wait until no page of `[first, end)` is pinned.
    pub(super) fn wait_for_pins(&self, dax: &FileDax, first: u64, end: u64) -> Result<()> {
        self.wait_until_none(dax, |p| p.overlaps(first, end))
            .map_err(|(held, cancelled)| {
                let held: Vec<String> = held
                    .iter()
                    .map(|&(a, b)| format!("{}..{}", a * PAGE, b * PAGE))
                    .collect();
                Error::Busy(format!(
                    "blocks of the file are pinned for direct I/O (bytes {}); {}",
                    held.join(", "),
                    if cancelled {
                        "the wait was cancelled".to_string()
                    } else {
                        format!("gave up after {} ms", self.layout_timeout().as_millis())
                    }
                ))
            })
    }

    /// Wait until no pin of the file is `held`, counted among the waiting
    /// calls meanwhile; on giving up (the layout timeout, or
    /// [`cancel_layout_breaks`](Self::cancel_layout_breaks)), the page
    /// ranges still held and whether it was cancelled.
    fn wait_until_none(
        &self,
        dax: &FileDax,
        held: impl Fn(&PinSlot) -> bool,
    ) -> std::result::Result<(), (Vec<(u64, u64)>, bool)> {
        let mut pins = dax.pins.lock().unwrap_or_else(|e| e.into_inner());
        if !pins.iter().any(&held) {
            return Ok(());
        }
        let deadline = Instant::now() + self.layout_timeout();
        let cancel = self.core.layout_cancel.load(Ordering::Acquire);
        let _waiting = Waiting::enter(&self.core.layout_waiting);
        while pins.iter().any(&held) {
            let now = Instant::now();
            let cancelled = self.core.layout_cancel.load(Ordering::Acquire) != cancel;
            if cancelled || now >= deadline {
                let still = pins.iter().filter(|p| held(p)).map(|p| p.pages).collect();
                return Err((still, cancelled));
            }
            pins = dax
                .unpinned
                .wait_timeout(pins, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

/// Counts a call among those waiting for pins while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Waiting<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicU64) -> Waiting<'a> {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
