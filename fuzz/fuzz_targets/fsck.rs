//! Check a damaged image (nothing may change), repair it, and insist that
//! a repair that says it fixed everything leaves an image a check finds
//! clean and that mounts.
#![no_main]

use daxfs_fuzz::{exercise, Harness};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let h = Harness::get();
    h.damage(data);
    let before = std::fs::read(&h.path).unwrap();
    let checked = daxfs::fsck(h.open(), false);
    assert!(
        std::fs::read(&h.path).unwrap() == before,
        "fsck without repair changed the image"
    );
    drop(checked);
    let Ok((report, _)) = daxfs::fsck(h.open(), true) else {
        return;
    };
    if report.exit_code() <= 1 {
        let (after, _) = daxfs::fsck(h.open(), false).expect("a repaired image checks");
        assert!(
            after.is_clean(),
            "repair said fixed: {:?}\nthen: {:?}",
            report.problems,
            after.problems
        );
        let fs = daxfs::Fs::mount(h.open()).expect("a repaired image mounts");
        exercise(&fs);
    }
});
