//! The device as the daemon hands it over: its descriptor, which pieces
//! map, and a mapping of the whole of it of our own, through which
//! writeback flushes the cache lines of device pages (the lines are the
//! same whichever mapping names them).

use daxfs::dax::DevicePages;
use daxfs_client::lease::Hello;
use pmem::FlushInstruction;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

pub struct RemoteDevice {
    fd: OwnedFd,
    path: PathBuf,
    base: usize,
    size: u64,
    msync: bool,
    flush: FlushInstruction,
}

impl RemoteDevice {
    pub fn open(fd: OwnedFd, hello: &Hello) -> Result<RemoteDevice, String> {
        let size = usize::try_from(hello.size).map_err(|_| "device too large".to_string())?;
        // SAFETY: a new shared mapping of the device at an address the
        // kernel picks; nothing else is replaced.
        let base = unsafe {
            (crate::real::real().mmap)(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "cannot map the device {}: {}",
                hello.device.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(RemoteDevice {
            fd,
            path: hello.device.clone(),
            base: base as usize,
            size: hello.size,
            msync: hello.msync,
            flush: FlushInstruction::detect(),
        })
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        // SAFETY: our own mapping of the whole device, no longer used.
        unsafe { (crate::real::real().munmap)(self.base as *mut libc::c_void, self.size as usize) };
    }
}

impl DevicePages for RemoteDevice {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn flush(&self, offset: u64, len: u64) -> daxfs::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let ptr = (self.base + offset as usize) as *const u8;
        let n = (end - offset) as usize;
        // SAFETY: `[offset, end)` lies inside our mapping of the device, and
        // the instruction was detected on this CPU.
        unsafe { self.flush.flush_range(ptr, n) };
        if self.msync {
            let page = (self.base + offset as usize) & !4095;
            let n = self.base + end as usize - page;
            // SAFETY: a range of our own mapping; msync changes no contents.
            unsafe { (crate::real::real().msync)(page as *mut libc::c_void, n, libc::MS_SYNC) };
        }
        Ok(())
    }

    /// Through the mapping that shows the bytes: our own view of the
    /// device is not faulted in, and faulting it in page by page would
    /// cost more than the flush.
    fn flush_shown(&self, addr: *const u8, offset: u64, len: u64) -> daxfs::Result<()> {
        // SAFETY: a mapping of ours shows `[addr, addr + len)` (the
        // caller's promise), and the instruction was detected on this CPU.
        unsafe { self.flush.flush_range(addr, len as usize) };
        if self.msync {
            return self.flush(offset, len);
        }
        Ok(())
    }

    fn drain(&self) {
        pmem::cpu::drain();
    }

    fn path(&self) -> &Path {
        &self.path
    }
}
