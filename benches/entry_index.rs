//! The entry index against `Mutex<BTreeMap>` and `RwLock<BTreeMap>` baselines:
//! load (hit and miss), lock plus unlock, store plus erase, a tagged scan, and
//! load throughput of two threads while a third stores.
//!
//! ```text
//! cargo bench --bench entry_index
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use daxfs::index::{Entry, EntryIndex, Order, Tag};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// Entries in the populated index: 1 Mi pages, every other one mapped.
const SPAN: u64 = 2 << 20;
const PROBES: usize = 4096;

/// What the baselines keep per page.
#[derive(Clone, Copy)]
struct Value {
    entry: Entry,
    tagged: bool,
    locked: bool,
}

fn probes(seed: u64, even: bool) -> Vec<u64> {
    let mut x = seed | 1;
    (0..PROBES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = x % SPAN;
            if even {
                i & !1
            } else {
                i | 1
            }
        })
        .collect()
}

fn populated() -> (EntryIndex, BTreeMap<u64, Value>) {
    let index = EntryIndex::new();
    let mut map = BTreeMap::new();
    for i in (0..SPAN).step_by(2) {
        let entry = Entry::new(Order::Pte, i);
        index.store(i, entry).unwrap();
        // 1% of the entries are tagged.
        let tagged = (i / 2) % 100 == 0;
        if tagged {
            index.set_tag(i, Tag::Towrite);
        }
        map.insert(
            i,
            Value {
                entry,
                tagged,
                locked: false,
            },
        );
    }
    (index, map)
}

fn single_thread(c: &mut Criterion) {
    let (index, map) = populated();
    let mutex = Mutex::new(map.clone());
    let rwlock = RwLock::new(map);
    let hits = probes(7, true);
    let misses = probes(11, false);

    let mut group = c.benchmark_group("entry_index");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for (name, keys) in [("load_hit", &hits), ("load_miss", &misses)] {
        let mut k = 0;
        group.bench_function(BenchmarkId::new(name, "index"), |b| {
            b.iter(|| {
                k = (k + 1) % PROBES;
                black_box(index.load(keys[k]))
            })
        });
        group.bench_function(BenchmarkId::new(name, "mutex_btreemap"), |b| {
            b.iter(|| {
                k = (k + 1) % PROBES;
                black_box(mutex.lock().unwrap().get(&keys[k]).map(|v| v.entry))
            })
        });
        group.bench_function(BenchmarkId::new(name, "rwlock_btreemap"), |b| {
            b.iter(|| {
                k = (k + 1) % PROBES;
                black_box(rwlock.read().unwrap().get(&keys[k]).map(|v| v.entry))
            })
        });
    }

    let mut k = 0;
    group.bench_function(BenchmarkId::new("lock_unlock", "index"), |b| {
        b.iter(|| {
            k = (k + 1) % PROBES;
            drop(black_box(index.lock_entry(hits[k], Order::Pte).unwrap()))
        })
    });
    group.bench_function(BenchmarkId::new("lock_unlock", "mutex_btreemap"), |b| {
        // The baseline's entry lock: a flag set, then cleared, under the map lock.
        b.iter(|| {
            k = (k + 1) % PROBES;
            mutex.lock().unwrap().get_mut(&hits[k]).unwrap().locked = true;
            mutex.lock().unwrap().get_mut(&hits[k]).unwrap().locked = false;
        })
    });

    group.bench_function(BenchmarkId::new("store_erase", "index"), |b| {
        b.iter(|| {
            k = (k + 1) % PROBES;
            index.store(misses[k], Entry::new(Order::Pte, 1)).unwrap();
            index.erase(misses[k]).unwrap();
        })
    });
    group.bench_function(BenchmarkId::new("store_erase", "mutex_btreemap"), |b| {
        b.iter(|| {
            k = (k + 1) % PROBES;
            let value = Value {
                entry: Entry::new(Order::Pte, 1),
                tagged: false,
                locked: false,
            };
            mutex.lock().unwrap().insert(misses[k], value);
            mutex.lock().unwrap().remove(&misses[k]);
        })
    });
    group.bench_function(BenchmarkId::new("store_erase", "rwlock_btreemap"), |b| {
        b.iter(|| {
            k = (k + 1) % PROBES;
            let value = Value {
                entry: Entry::new(Order::Pte, 1),
                tagged: false,
                locked: false,
            };
            rwlock.write().unwrap().insert(misses[k], value);
            rwlock.write().unwrap().remove(&misses[k]);
        })
    });

    group.throughput(Throughput::Elements(SPAN / 2));
    group.bench_function(BenchmarkId::new("tagged_scan_1pct", "index"), |b| {
        b.iter(|| {
            let (mut at, mut found) = (0, 0u64);
            while let Some((base, _)) = index.find_next_tagged(at, Tag::Towrite) {
                found += 1;
                at = base + 1;
            }
            assert_eq!(found, (SPAN / 2).div_ceil(100));
        })
    });
    group.bench_function(
        BenchmarkId::new("tagged_scan_1pct", "rwlock_btreemap"),
        |b| {
            b.iter(|| {
                let found = rwlock.read().unwrap().values().filter(|v| v.tagged).count() as u64;
                assert_eq!(found, (SPAN / 2).div_ceil(100));
            })
        },
    );
    group.finish();
}

/// Wall time for two reader threads to make `iters` loads each while a
/// third thread keeps storing and erasing.
fn contended<R, W>(iters: u64, read: R, write: W) -> Duration
where
    R: Fn(u64) + Sync,
    W: Fn(u64) + Sync,
{
    let stop = AtomicBool::new(false);
    let keys = probes(13, true);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                write(k);
                k += 1;
            }
        });
        let start = Instant::now();
        let readers: Vec<_> = (0..2)
            .map(|t| {
                let (keys, read) = (&keys, &read);
                s.spawn(move || {
                    for i in 0..iters {
                        read(keys[(i as usize * 2 + t) % PROBES]);
                    }
                })
            })
            .collect();
        for reader in readers {
            reader.join().unwrap();
        }
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        elapsed
    })
}

fn two_readers_one_writer(c: &mut Criterion) {
    let (index, map) = populated();
    let rwlock = RwLock::new(map);
    let writer_keys = probes(17, false);
    let mut group = c.benchmark_group("entry_index_contended");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(2));
    group.bench_function(BenchmarkId::new("load_2_readers_1_writer", "index"), |b| {
        b.iter_custom(|iters| {
            contended(
                iters,
                |key| {
                    black_box(index.load(key));
                },
                |k| {
                    let key = writer_keys[k as usize % PROBES];
                    let _ = index.store(key, Entry::new(Order::Pte, 1));
                    let _ = index.erase(key);
                },
            )
        })
    });
    group.bench_function(
        BenchmarkId::new("load_2_readers_1_writer", "rwlock_btreemap"),
        |b| {
            b.iter_custom(|iters| {
                contended(
                    iters,
                    |key| {
                        black_box(rwlock.read().unwrap().get(&key).map(|v| v.entry));
                    },
                    |k| {
                        let key = writer_keys[k as usize % PROBES];
                        let value = Value {
                            entry: Entry::new(Order::Pte, 1),
                            tagged: false,
                            locked: false,
                        };
                        rwlock.write().unwrap().insert(key, value);
                        rwlock.write().unwrap().remove(&key);
                    },
                )
            })
        },
    );
    group.finish();
}

criterion_group!(benches, single_thread, two_readers_one_writer);
criterion_main!(benches);
