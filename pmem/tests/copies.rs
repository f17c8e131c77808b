//! Copies and fills through the device API are exact at every size and
//! alignment, including across the non-temporal threshold.

mod common;

use common::{shm_dir, small_device};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn memcpy_persist_stores_exactly_the_source(
        offset in 0u64..(1 << 20), len in 0usize..(70 << 10), seed: u8,
    ) {
        let dir = shm_dir();
        let (dev, _) = small_device(&dir);
        dev.memset_persist(0, 0xEE, 2 << 20).unwrap();
        let src: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        dev.memcpy_persist(offset, &src).unwrap();
        let mut back = vec![0u8; len + 128];
        let start = offset.saturating_sub(64);
        let lead = (offset - start) as usize;
        dev.read(start, &mut back[..lead + len + 64]).unwrap();
        prop_assert!(back[..lead].iter().all(|&b| b == 0xEE), "bytes before the copy changed");
        prop_assert_eq!(&back[lead..lead + len], &src[..]);
        prop_assert!(back[lead + len..lead + len + 64].iter().all(|&b| b == 0xEE), "bytes after the copy changed");
    }

    #[test]
    fn memset_persist_fills_exactly_the_range(
        offset in 0u64..(1 << 20), len in 0u64..(70 << 10), byte: u8,
    ) {
        let dir = shm_dir();
        let (dev, _) = small_device(&dir);
        let other = !byte;
        dev.memset_persist(0, other, 2 << 20).unwrap();
        dev.memset_persist(offset, byte, len).unwrap();
        let start = offset.saturating_sub(64);
        let mut back = vec![0u8; (len + 128) as usize];
        dev.read(start, &mut back).unwrap();
        let lead = (offset - start) as usize;
        prop_assert!(back[..lead].iter().all(|&b| b == other));
        prop_assert!(back[lead..lead + len as usize].iter().all(|&b| b == byte));
        prop_assert!(back[lead + len as usize..].iter().all(|&b| b == other));
    }
}

#[test]
fn plain_writes_are_visible_before_any_flush() {
    let dir = shm_dir();
    let (dev, _) = small_device(&dir);
    dev.write(100, b"cached").unwrap();
    let mut buf = [0u8; 6];
    dev.read(100, &mut buf).unwrap();
    assert_eq!(&buf, b"cached");
}
