//! Helpers shared by the device tests.
#![allow(dead_code)]

use pmem::{Device, DeviceOptions};
use std::path::PathBuf;

/// A directory on tmpfs (memory-backed), removed on drop.
pub fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pmem-test")
        .tempdir_in("/dev/shm")
        .expect("a temporary directory in /dev/shm")
}

/// A fresh 16 MiB device in `dir`.
pub fn small_device(dir: &tempfile::TempDir) -> (Device, PathBuf) {
    let path = dir.path().join("pmem0.img");
    let dev = Device::create(&path, 16 << 20, &DeviceOptions::new()).expect("create a device");
    (dev, path)
}
