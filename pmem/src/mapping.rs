//! Virtual memory: reservations of address space at a chosen alignment,
//! the device's 2 MiB-aligned shared mapping, the swapping of single pages
//! for an inaccessible stand-in (the emulation of poison), and short-lived
//! windows onto a page.
//!
//! All `mmap` and `munmap` calls of the crate live here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// 2 MiB: the size of a PMD mapping and the alignment of the device mapping.
pub const HUGE_PAGE: u64 = 2 << 20;

/// Address space reserved (mapped `PROT_NONE`, reserving no memory) with
/// a spot of `len` bytes in it whose address lies `phase` bytes past a
/// multiple of `align`, for mappings put there with `MAP_FIXED` (the
/// device's own, or a DAX mapping's pieces, where 2 MiB-aligned file
/// offsets must fall on 2 MiB-aligned addresses). The whole reservation
/// goes when this is dropped, with whatever was mapped into it, unless
/// [`keep_spot`](Self::keep_spot) kept the spot.
#[derive(Debug)]
pub struct Reservation {
    start: usize,
    len: usize,
    spot: usize,
}

impl Reservation {
    /// Reserve `len` bytes at `phase` past a multiple of `align` (a power
    /// of two).
    pub fn new(len: usize, align: usize, phase: usize) -> io::Result<Reservation> {
        debug_assert!(align.is_power_of_two() && phase < align);
        let reserve_len = len
            .checked_add(align)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: an anonymous PROT_NONE reservation at an address of the
        // kernel's choosing touches no existing mapping.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let spot = (start + align - phase).next_multiple_of(align) - align + phase;
        let spot = if spot < start { spot + align } else { spot };
        Ok(Reservation {
            start,
            len: reserve_len,
            spot,
        })
    }

    /// Reserve `[addr, addr + len)` itself (page-aligned), replacing what
    /// was mapped there, as `MAP_FIXED` does: for a caller that asked for
    /// that place (a program's `mmap` with `MAP_FIXED` into a reservation
    /// of its own).
    ///
    /// # Safety
    /// Whatever the range held is gone: the caller owns it (a program
    /// asking for `MAP_FIXED` promises the same).
    pub unsafe fn fixed(addr: usize, len: usize) -> io::Result<Reservation> {
        // SAFETY: the caller gave up the range.
        let raw = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Reservation {
            start: addr,
            len,
            spot: addr,
        })
    }

    /// The address of the spot.
    pub fn spot(&self) -> usize {
        self.spot
    }

    /// Give back the slack around the spot, and the spot itself to the
    /// caller, who now owns `[spot, spot + spot_len)` (and must unmap it).
    fn keep_spot(self, spot_len: usize) -> usize {
        let this = std::mem::ManuallyDrop::new(self);
        let (head, tail_start) = (this.spot - this.start, this.spot + spot_len);
        let tail = this.start + this.len - tail_start;
        // SAFETY: the head and tail slack are parts of our own reservation.
        unsafe {
            if head > 0 {
                libc::munmap(this.start as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap(tail_start as *mut libc::c_void, tail);
            }
        }
        this.spot
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the range `new` mapped, which only this owns; what was
        // mapped into it with MAP_FIXED goes with it.
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
    }
}

/// An empty memory file: its pages, mapped, all lie past its end, so any
/// access to them raises `SIGBUS` (the stand-in for poison, and for pages
/// past the end of a file).
pub fn sigbus_file(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How the device file is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapMode {
    /// `MAP_SHARED_VALIDATE | MAP_SYNC`: the kernel guarantees DAX.
    Sync,
    /// Plain `MAP_SHARED`.
    Shared,
    /// `MAP_PRIVATE` over a file opened read-only: stores copy the page
    /// into this process's memory, and the file is never written.
    Private,
}

impl MapMode {
    fn flags(self) -> libc::c_int {
        match self {
            MapMode::Sync => libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
            MapMode::Shared => libc::MAP_SHARED,
            MapMode::Private => libc::MAP_PRIVATE,
        }
    }
}

/// A shared read-write mapping of a whole device, starting at a 2 MiB-aligned
/// virtual address so that any 2 MiB-aligned device offset is a 2 MiB-aligned
/// address too. Unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    mode: MapMode,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving the
// owner between threads, or sharing it, changes nothing about its validity.
unsafe impl Send for Mapping {}
// SAFETY: as above; the crate's accessors define who may touch which bytes.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` from offset 0 at a multiple of `align` (a power
    /// of two, at least 2 MiB). `MAP_SYNC` is probed for first: the second
    /// value is how the file maps shared (what its persistence is). With
    /// `private`, the mapping is [`MapMode::Private`] instead.
    pub(crate) fn map_aligned(
        fd: BorrowedFd<'_>,
        len: usize,
        align: usize,
        private: bool,
    ) -> io::Result<(Mapping, MapMode)> {
        let shared = if probe_map_sync(fd, len)? {
            MapMode::Sync
        } else {
            MapMode::Shared
        };
        let mode = if private { MapMode::Private } else { shared };
        debug_assert!(align.is_power_of_two() && align >= HUGE_PAGE as usize);
        let reservation = Reservation::new(len, align, 0)?;
        let aligned = reservation.spot();
        // SAFETY: [aligned, aligned + len) lies inside the reservation made
        // above, which this function owns, so MAP_FIXED replaces nothing else.
        let mapped = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                mode.flags() | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let aligned = reservation.keep_spot(len);
        let base = NonNull::new(aligned as *mut u8).expect("an aligned mapping is never at 0");
        Ok((Mapping { base, len, mode }, shared))
    }

    /// Map all of `fd` anew over this mapping in `mode` (private pages are
    /// dropped when going back to shared).
    ///
    /// # Safety
    /// No reference into the mapping may be alive and nobody may be using
    /// it: every page is replaced.
    pub(crate) unsafe fn remap(&mut self, fd: BorrowedFd<'_>, mode: MapMode) -> io::Result<()> {
        // SAFETY: forwarded from this function's contract; the whole range
        // is this mapping's own.
        unsafe { self.map_over(0, self.len, mode.flags(), fd, 0)? };
        self.mode = mode;
        Ok(())
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Put, over `[offset, offset + len)` of this mapping, a shared mapping of
    /// an empty file: any access there now raises `SIGBUS`, as a load of
    /// poisoned memory does.
    ///
    /// # Safety
    /// No reference into the range may be alive, and no other thread may be
    /// accessing it: its contents become unreachable through this mapping.
    pub(crate) unsafe fn replace_with_sigbus(
        &self,
        offset: usize,
        len: usize,
        empty: BorrowedFd<'_>,
    ) -> io::Result<()> {
        // SAFETY: forwarded from this function's contract; `empty` has size 0,
        // so every page mapped from it lies past its end.
        unsafe { self.map_over(offset, len, libc::MAP_SHARED, empty, 0) }
    }

    /// Map the device's own pages back over `[offset, offset + len)`.
    ///
    /// # Safety
    /// As for [`replace_with_sigbus`](Self::replace_with_sigbus); `fd` must be
    /// the file this mapping was made from.
    pub(crate) unsafe fn restore(
        &self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
    ) -> io::Result<()> {
        // SAFETY: forwarded from this function's contract; the device file
        // maps its own bytes back at their own offset.
        unsafe { self.map_over(offset, len, self.mode.flags(), fd, offset) }
    }

    /// # Safety
    /// As for [`replace_with_sigbus`](Self::replace_with_sigbus).
    unsafe fn map_over(
        &self,
        offset: usize,
        len: usize,
        flags: libc::c_int,
        fd: BorrowedFd<'_>,
        file_offset: usize,
    ) -> io::Result<()> {
        self.check(offset, len);
        // SAFETY: the range lies inside this mapping (checked above), so
        // MAP_FIXED replaces only our own pages; the caller guarantees nobody
        // uses them.
        let got = unsafe {
            libc::mmap(
                self.base().add(offset).cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_offset as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "remap of {offset:#x}+{len:#x} outside a mapping of {:#x} bytes",
            self.len
        );
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is the mapping this value owns; nothing borrows it
        // past the owner's lifetime.
        unsafe { libc::munmap(self.base().cast(), self.len) };
    }
}

/// A short-lived shared mapping of part of the device file, used to reach the
/// bytes of a page whose place in the main mapping holds poison.
pub(crate) struct Window {
    ptr: NonNull<u8>,
    len: usize,
}

impl Window {
    /// Map `len` bytes of `fd` at file offset `offset` (which must suit the
    /// file's mapping granularity); read-only unless `writable`.
    pub(crate) fn map(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> io::Result<Window> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping at an address of the kernel's choosing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).expect("mmap never returns 0 on success");
        Ok(Window { ptr, len })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the window owns this mapping.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Whether the kernel accepts `MAP_SYNC` for this file: only a DAX mapping does.
fn probe_map_sync(fd: BorrowedFd<'_>, len: usize) -> io::Result<bool> {
    // Probe with the first 2 MiB (a /dev/dax of 2 MiB alignment refuses less).
    let probe_len = len.min(HUGE_PAGE as usize);
    // SAFETY: a new mapping at an address of the kernel's choosing, unmapped
    // at once.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            probe_len,
            libc::PROT_READ,
            MapMode::Sync.flags(),
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(false),
            _ => Err(err),
        };
    }
    // SAFETY: the probe mapping made just above.
    unsafe { libc::munmap(ptr, probe_len) };
    Ok(true)
}

#[cfg(test)]
mod reservation_tests {
    use super::*;

    /// The spot lies at the phase asked for, inside the reservation, which
    /// takes MAP_FIXED pieces there.
    #[test]
    fn a_reservation_places_its_spot_at_the_phase_asked() {
        let align = HUGE_PAGE as usize;
        for phase in [0, 4096, align - 4096] {
            let r = Reservation::new(3 * align, align, phase).unwrap();
            assert_eq!(r.spot() % align, phase);
            assert!(r.spot() >= r.start && r.spot() + 3 * align <= r.start + r.len);
            // SAFETY: a page inside our own reservation, replaced by an
            // anonymous readable one.
            let page = unsafe {
                libc::mmap(
                    r.spot() as *mut libc::c_void,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            assert_eq!(page as usize, r.spot());
        }
    }
}
