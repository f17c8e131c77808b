//! Early notice of memory failure: a process that asked for it with
//! `prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY)` gets `SIGBUS`
//! with `BUS_MCEERR_AO` as soon as a page it has mapped is found poisoned,
//! before it touches it. (A file of its own: the setting is per process.)

use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{BusSignal, Fs, MapOptions, ROOT};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

static CODE: AtomicI32 = AtomicI32::new(0);
static ADDR: AtomicUsize = AtomicUsize::new(0);
static LSB: AtomicI32 = AtomicI32::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGBUS's siginfo to this SA_SIGINFO handler.
    let sig = unsafe { BusSignal::read(info) };
    CODE.store(sig.code, Ordering::SeqCst);
    ADDR.store(sig.addr, Ordering::SeqCst);
    LSB.store(sig.addr_lsb as i32, Ordering::SeqCst);
    COUNT.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn a_process_that_asked_for_early_notice_gets_bus_mceerr_ao() {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-early")
        .tempdir_in("/dev/shm")
        .unwrap();
    let dev = Device::create(dir.path().join("fs.img"), 64 << 20, &DeviceOptions::new()).unwrap();
    let fs = Fs::format(dev).unwrap();
    let ino = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap().0.ino;
    fs.write(ino, 0, &vec![9u8; 65536]).unwrap();
    // SAFETY: installing an SA_SIGINFO handler for SIGBUS in this process.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
    // SAFETY: PR_MCE_KILL takes integers only.
    let set = unsafe {
        libc::prctl(
            libc::PR_MCE_KILL,
            libc::PR_MCE_KILL_SET,
            libc::PR_MCE_KILL_EARLY,
            0,
            0,
        )
    };
    assert_eq!(set, 0, "prctl: {}", std::io::Error::last_os_error());
    let opts = MapOptions {
        populate: true,
        ..MapOptions::default()
    };
    // SAFETY: only this test touches the file.
    let map = unsafe { fs.mmap(ino, 0, 65536, opts) }.unwrap();
    let at = fs.device_offset(ino, 12288).unwrap().unwrap();
    fs.inject_poison(at, 512).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while COUNT.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(COUNT.load(Ordering::SeqCst), 1, "one early notice");
    assert_eq!(CODE.load(Ordering::SeqCst), 5, "BUS_MCEERR_AO");
    assert_eq!(ADDR.load(Ordering::SeqCst), map.as_ptr() as usize + 12288);
    assert_eq!(LSB.load(Ordering::SeqCst), 12);
    // A page it did not have mapped gives no notice.
    let other = fs.create(ROOT, b"g", 0o644, 0, 0, true).unwrap().0.ino;
    fs.write(other, 0, &[1; 4096]).unwrap();
    let at = fs.device_offset(other, 0).unwrap().unwrap();
    fs.inject_poison(at, 512).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(COUNT.load(Ordering::SeqCst), 1);
    drop(map);
    fs.unmount().unwrap();
}
