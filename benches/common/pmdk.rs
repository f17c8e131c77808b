//! PMDK's libpmem, for benchmarks built with the `pmdk` feature (Debian's
//! libpmem-dev), included by `#[path]` so each bench links it alike.

#[link(name = "pmem")]
extern "C" {
    pub fn pmem_memcpy_persist(
        dst: *mut std::ffi::c_void,
        src: *const std::ffi::c_void,
        len: usize,
    ) -> *mut std::ffi::c_void;
}
