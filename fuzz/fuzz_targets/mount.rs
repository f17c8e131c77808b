//! Mount a damaged image and use it: any outcome but a panic or a hang
//! is fine (a refusal must be an error).
#![no_main]

use daxfs_fuzz::{exercise, Harness};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let h = Harness::get();
    h.damage(data);
    if let Ok(fs) = daxfs::Fs::mount(h.open()) {
        exercise(&fs);
        let _ = fs.unmount();
    }
});
