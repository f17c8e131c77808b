//! Many threads against one namespace: atomic open against rename and
//! unlink, directory renames against walks inside them, links against link
//! counts, and the shrinker against unmount. Every race runs for a few
//! seconds (`DAXFS_RACE_SECS`, default 2) from a printed seed
//! (`DAXFS_RACE_SEED` replays one), under a watchdog that fails the test
//! instead of letting it hang. After each: unmount finds no inode left
//! referenced, fsck is clean, and the tree is what the operations that
//! succeeded imply.

use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{CreateOptions, Error, FileKind, Fs, Ino, RenameFlags, ROOT};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

struct Image {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn image(size: u64) -> (Image, Fs) {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-race")
        .tempdir_in("/dev/shm")
        .unwrap();
    let path = dir.path().join("fs.img");
    let dev = Device::create(&path, size, &DeviceOptions::new()).unwrap();
    (Image { _dir: dir, path }, Fs::format(dev).unwrap())
}

fn mount(img: &Image) -> Fs {
    Fs::mount(Device::open(&img.path, &DeviceOptions::new()).unwrap()).unwrap()
}

/// Unmount (which itself checks that no inode is left referenced), check
/// the image, and mount it again.
fn unmount_check_remount(img: &Image, fs: Fs) -> Fs {
    fs.unmount().expect("unmount after the race");
    assert_eq!(fs.unmount().unwrap_err().errno(), Error::Unmounted.errno());
    let dev = fs.into_device().unwrap();
    let (report, dev) = daxfs::fsck(dev, false).unwrap();
    assert!(report.is_clean(), "fsck after the race: {report:?}");
    drop(dev);
    mount(img)
}

fn secs() -> Duration {
    let secs = std::env::var("DAXFS_RACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn seed(test: &str) -> u64 {
    let seed = std::env::var("DAXFS_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: DAXFS_RACE_SEED={seed}");
    seed
}

/// xorshift64*: enough randomness for choosing operations, and replayable.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, thread: u64) -> Rng {
        Rng((seed ^ thread.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Fails the test (the whole process: a hung thread cannot be unwound) if
/// it is still running after `limit`.
struct Watchdog(#[allow(dead_code)] mpsc::Sender<()>);

fn watchdog(what: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: {what} still running after {limit:?}: a hang or a deadlock");
            std::process::exit(101);
        }
    });
    Watchdog(tx)
}

fn allowed(what: &str, r: Result<(), Error>, ok: &[i32]) {
    if let Err(e) = r {
        assert!(ok.contains(&e.errno()), "{what}: unexpected error {e}");
    }
}

const TAG: &[u8] = b"user.id";

fn tag_of(fs: &Fs, ino: Ino) -> u64 {
    let raw = fs.getxattr(ino, TAG).expect("every file is tagged");
    u64::from_le_bytes(raw.try_into().unwrap())
}

/// Every regular file under `dir`, by path, with its tag.
fn files(fs: &Fs, dir: Ino, path: &str, out: &mut BTreeMap<String, (Ino, u64)>) {
    for e in fs.readdir(dir, 2).unwrap() {
        let name = String::from_utf8(e.name.clone()).unwrap();
        let p = format!("{path}/{name}");
        match e.kind {
            FileKind::Dir => files(fs, e.ino, &p, out),
            _ => {
                out.insert(p, (e.ino, tag_of(fs, e.ino)));
            }
        }
    }
}

#[test]
fn atomic_open_never_fails_stale_nor_makes_two_files_for_one_name() {
    let _dog = watchdog("the atomic-open race", secs() * 4 + Duration::from_secs(60));
    let seed = seed("atomic_open");
    let (img, fs) = image(128 << 20);
    let d1 = fs.mkdir(ROOT, b"d1", 0o755, 0, 0).unwrap().ino;
    let d2 = fs.mkdir(ROOT, b"d2", 0o755, 0, 0).unwrap().ino;
    let free_before = fs.statfs().free_files;
    let dirs = [(d1, "d1"), (d2, "d2")];
    let names: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
    let next_tag = AtomicU64::new(1);
    let created = AtomicU64::new(0);
    let unlinked = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (fs, next_tag, created, unlinked, stop) =
                (&fs, &next_tag, &created, &unlinked, &stop);
            s.spawn(move || {
                let mut rng = Rng::new(seed, t);
                while !stop.load(Ordering::Relaxed) {
                    let &(dir, dir_name) = rng.pick(&dirs);
                    let name = *rng.pick(&names);
                    match rng.below(8) {
                        0..=2 => {
                            let opts = CreateOptions {
                                exclusive: rng.below(2) == 0,
                                truncate: rng.below(3) == 0,
                                mode: 0o644,
                                ..Default::default()
                            };
                            match fs.open_create(dir, name, &opts) {
                                Ok((attr, handle, made)) => {
                                    assert_eq!(attr.kind, FileKind::File);
                                    if made {
                                        // Tag it while the handle keeps it alive,
                                        // whatever renames and unlinks do meanwhile.
                                        let tag = next_tag.fetch_add(1, Ordering::Relaxed);
                                        fs.setxattr(
                                            attr.ino,
                                            TAG,
                                            &tag.to_le_bytes(),
                                            false,
                                            false,
                                        )
                                        .unwrap();
                                        created.fetch_add(1, Ordering::Relaxed);
                                    } else {
                                        assert!(!opts.exclusive, "O_EXCL opened an existing file");
                                    }
                                    fs.write(attr.ino, 0, b"x").unwrap();
                                    fs.close(handle).unwrap();
                                }
                                Err(e) => assert!(
                                    opts.exclusive && e.errno() == libc::EEXIST,
                                    "open_create({opts:?}) failed: {e}"
                                ),
                            }
                        }
                        3 | 4 => {
                            let &(to, _) = rng.pick(&dirs);
                            let to_name = *rng.pick(&names);
                            let flags = RenameFlags {
                                noreplace: true,
                                ..Default::default()
                            };
                            let r = fs.rename(dir, name, to, to_name, flags);
                            allowed("rename", r, &[libc::ENOENT, libc::EEXIST]);
                        }
                        5 => match fs.unlink(dir, name) {
                            Ok(()) => {
                                unlinked.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => assert_eq!(e.errno(), libc::ENOENT, "unlink: {e}"),
                        },
                        6 => match fs.lookup_ref(dir, name) {
                            Ok(attr) => {
                                assert_eq!((attr.kind, attr.nlink), (FileKind::File, 1));
                                // Remembered: usable even if unlinked meanwhile.
                                fs.getattr(attr.ino).unwrap();
                                fs.forget(attr.ino, 1).unwrap();
                            }
                            Err(e) => assert_eq!(e.errno(), libc::ENOENT, "lookup: {e}"),
                        },
                        _ => {
                            let path = format!("/{dir_name}/{}", name[0] as char);
                            match fs.resolve(&path) {
                                Ok(ino) => match fs.getattr(ino) {
                                    // Gone between the walk and the stat is fine;
                                    // a directory or a stale error is not.
                                    Ok(attr) => assert_ne!(attr.kind, FileKind::Dir, "{path}"),
                                    Err(e) => assert_eq!(e.errno(), libc::ENOENT),
                                },
                                Err(e) => assert_eq!(e.errno(), libc::ENOENT, "{path}: {e}"),
                            }
                        }
                    }
                }
            });
        }
        std::thread::sleep(secs());
        stop.store(true, Ordering::Relaxed);
    });
    let created = created.load(Ordering::Relaxed);
    let unlinked = unlinked.load(Ordering::Relaxed);
    let mut tree = BTreeMap::new();
    files(&fs, ROOT, "", &mut tree);
    assert_eq!(
        tree.len() as u64,
        created - unlinked,
        "files: {created} created, {unlinked} unlinked, {tree:?}"
    );
    let tags: HashSet<u64> = tree.values().map(|v| v.1).collect();
    assert_eq!(tags.len(), tree.len(), "one file under two names: {tree:?}");
    assert!(created > 100, "the race ran ({created} creates)");
    // Every unlinked file was freed: nothing holds it any more.
    assert_eq!(fs.statfs().free_files, free_before - tree.len() as u64);
    for (path, (ino, _)) in &tree {
        assert_eq!(fs.resolve(path).unwrap(), *ino, "the cached walk agrees");
    }
    let fs = unmount_check_remount(&img, fs);
    let mut again = BTreeMap::new();
    files(&fs, ROOT, "", &mut again);
    assert_eq!(again, tree, "the tree survives unmount");
    fs.unmount().unwrap();
}

#[test]
fn directory_renames_against_walks_never_give_two_parents_or_a_cycle() {
    let _dog = watchdog(
        "the directory-rename race",
        secs() * 4 + Duration::from_secs(60),
    );
    let seed = seed("directory_renames");
    let (img, fs) = image(128 << 20);
    // Twelve directories, each with a tagged file "f", all starting at the
    // root; renames move them anywhere, including under each other.
    let names: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
    let mut dir_inos = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let d = fs.mkdir(ROOT, name.as_bytes(), 0o755, 0, 0).unwrap().ino;
        let (f, h, _) = fs
            .open_create(
                d,
                b"f",
                &CreateOptions {
                    mode: 0o644,
                    ..Default::default()
                },
            )
            .unwrap();
        fs.setxattr(f.ino, TAG, &(i as u64).to_le_bytes(), false, false)
            .unwrap();
        fs.close(h).unwrap();
        dir_inos.insert(d, name.clone());
    }
    let stop = AtomicBool::new(false);
    let moves = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (fs, stop, moves, names) = (&fs, &stop, &moves, &names);
            let dirs: Vec<Ino> = dir_inos.keys().copied().collect();
            s.spawn(move || {
                let mut rng = Rng::new(seed, t);
                while !stop.load(Ordering::Relaxed) {
                    // Move a directory, wherever it is now, under another (or
                    // the root); a move into its own subtree must fail.
                    let name = rng.pick(names).as_bytes();
                    let Some(from) = find_parent(fs, &dirs, name) else {
                        continue;
                    };
                    let to = if rng.below(4) == 0 {
                        ROOT
                    } else {
                        *rng.pick(&dirs)
                    };
                    let r = fs.rename(from, name, to, name, RenameFlags::default());
                    match r {
                        Ok(()) => {
                            moves.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => assert!(
                            [libc::ENOENT, libc::EINVAL, libc::EEXIST, libc::ENOTEMPTY]
                                .contains(&e.errno()),
                            "rename: {e}"
                        ),
                    }
                }
            });
        }
        for t in 2..4u64 {
            let (fs, stop, names) = (&fs, &stop, &names);
            s.spawn(move || {
                let mut rng = Rng::new(seed, t);
                while !stop.load(Ordering::Relaxed) {
                    // Walk a random path of up to three directories.
                    let depth = 1 + rng.below(3);
                    let mut path = String::new();
                    for _ in 0..depth {
                        path.push('/');
                        let name: &String = rng.pick(names);
                        path.push_str(name);
                    }
                    match fs.resolve(&path) {
                        Ok(ino) => {
                            // What a walk found is a directory whose ".." is a
                            // directory, and whose file is its own.
                            match fs.lookup(ino, b"..") {
                                Ok(parent) => assert_eq!(parent.kind, FileKind::Dir),
                                Err(e) => assert_eq!(e.errno(), libc::ENOENT, "{path}/..: {e}"),
                            }
                            let f = format!("{path}/f");
                            match fs.resolve(&f) {
                                Ok(f) => assert_ne!(f, ino),
                                Err(e) => assert_eq!(e.errno(), libc::ENOENT, "{f}: {e}"),
                            }
                        }
                        Err(e) => assert_eq!(e.errno(), libc::ENOENT, "{path}: {e}"),
                    }
                }
            });
        }
        std::thread::sleep(secs());
        stop.store(true, Ordering::Relaxed);
    });
    assert!(moves.load(Ordering::Relaxed) > 100, "the race ran");
    check_tree(&fs, &dir_inos);
    let fs = unmount_check_remount(&img, fs);
    check_tree(&fs, &dir_inos);
    fs.unmount().unwrap();
}

/// The directory (among `dirs` and the root) that holds `name` now.
fn find_parent(fs: &Fs, dirs: &[Ino], name: &[u8]) -> Option<Ino> {
    std::iter::once(ROOT)
        .chain(dirs.iter().copied())
        .find(|&d| fs.lookup(d, name).is_ok())
}

/// Every directory is reachable from the root exactly once, its ".." is
/// the directory it was found in, it still holds its own file, and the
/// cached walk of its path agrees.
fn check_tree(fs: &Fs, dirs: &HashMap<Ino, String>) {
    let mut seen = HashSet::new();
    let mut stack = vec![(ROOT, String::new())];
    while let Some((dir, path)) = stack.pop() {
        for e in fs.readdir(dir, 2).unwrap() {
            if e.kind != FileKind::Dir || (dir == ROOT && e.name == b"lost+found") {
                continue; // (not one of the racing directories)
            }
            assert!(seen.insert(e.ino), "directory {} has two parents", e.ino);
            assert_eq!(
                fs.lookup(e.ino, b"..").unwrap().ino,
                dir,
                "its parent pointer"
            );
            assert_eq!(dirs[&e.ino].as_bytes(), e.name.as_slice());
            let path = format!("{path}/{}", dirs[&e.ino]);
            assert_eq!(fs.resolve(&path).unwrap(), e.ino, "{path}");
            let f = fs.lookup(e.ino, b"f").unwrap();
            assert_eq!(fs.resolve(format!("{path}/f")).unwrap(), f.ino, "{path}/f");
            assert_eq!(fs.getattr(e.ino).unwrap().nlink, 2 + count_dirs(fs, e.ino));
            assert_eq!(
                fs.readdir(e.ino, 2).unwrap().len() as u32,
                1 + count_dirs(fs, e.ino)
            );
            tag_of(fs, f.ino);
            stack.push((e.ino, path));
        }
    }
    assert_eq!(seen.len(), dirs.len(), "a directory was cut off (a cycle)");
}

fn count_dirs(fs: &Fs, dir: Ino) -> u32 {
    let entries = fs.readdir(dir, 2).unwrap();
    entries.iter().filter(|e| e.kind == FileKind::Dir).count() as u32
}

#[test]
fn links_and_unlinks_keep_link_counts_exact() {
    let _dog = watchdog("the link race", secs() * 4 + Duration::from_secs(60));
    let seed = seed("links");
    let (img, fs) = image(64 << 20);
    let d1 = fs.mkdir(ROOT, b"d1", 0o755, 0, 0).unwrap().ino;
    let d2 = fs.mkdir(ROOT, b"d2", 0o755, 0, 0).unwrap().ino;
    let file = fs.create(ROOT, b"orig", 0o644, 0, 0, true).unwrap().0.ino;
    fs.setxattr(file, TAG, &7u64.to_le_bytes(), false, false)
        .unwrap();
    let stop = AtomicBool::new(false);
    let names: Vec<Vec<u8>> = (0..6).map(|i| format!("l{i}").into_bytes()).collect();
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (fs, stop, names) = (&fs, &stop, &names);
            s.spawn(move || {
                let mut rng = Rng::new(seed, t);
                while !stop.load(Ordering::Relaxed) {
                    let dir = *rng.pick(&[d1, d2]);
                    let name = rng.pick(names);
                    match rng.below(3) {
                        0 => allowed("link", fs.link(file, dir, name).map(drop), &[libc::EEXIST]),
                        1 => allowed("unlink", fs.unlink(dir, name), &[libc::ENOENT]),
                        _ => {
                            let nlink = fs.getattr(file).unwrap().nlink;
                            assert!(
                                (1..=1 + 2 * names.len() as u32).contains(&nlink),
                                "nlink {nlink}"
                            );
                        }
                    }
                }
            });
        }
        std::thread::sleep(secs());
        stop.store(true, Ordering::Relaxed);
    });
    let count = |fs: &Fs| -> u32 {
        [ROOT, d1, d2]
            .iter()
            .flat_map(|&d| fs.readdir(d, 2).unwrap())
            .filter(|e| e.ino == file)
            .count() as u32
    };
    assert_eq!(fs.getattr(file).unwrap().nlink, count(&fs));
    let fs = unmount_check_remount(&img, fs);
    assert_eq!(fs.getattr(file).unwrap().nlink, count(&fs));
    assert_eq!(tag_of(&fs, file), 7);
    fs.unmount().unwrap();
}

#[test]
fn the_shrinker_racing_unmount_leaves_no_busy_inode_behind() {
    let _dog = watchdog("shrinker against unmount", Duration::from_secs(120));
    let (img, fs) = image(64 << 20);
    fs.unmount().unwrap();
    drop(fs);
    let mut evicted = 0;
    for round in 0..150 {
        let fs = mount(&img);
        let parent = fs.mkdir(ROOT, b"parent", 0o755, 0, 0).unwrap().ino;
        let mut children = Vec::new();
        for i in 0..20 {
            let name = format!("child{i}");
            children.push(
                fs.create(parent, name.as_bytes(), 0o644, 0, 0, true)
                    .unwrap()
                    .0
                    .ino,
            );
            fs.resolve(format!("/parent/{name}")).unwrap();
        }
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let shrinker = s.spawn(|| {
                let mut evicted = 0;
                loop {
                    // Against a budget of nothing: evict all it may.
                    match fs.shrink_to(1) {
                        Ok(shrunk) => evicted += shrunk.inodes,
                        Err(Error::Unmounted) => return evicted,
                        Err(e) => panic!("shrink: {e}"),
                    }
                    if done.load(Ordering::Relaxed) {
                        return evicted;
                    }
                }
            });
            // Tear the parent down while the shrinker evicts its children.
            for i in 0..20 {
                fs.unlink(parent, format!("child{i}").as_bytes()).unwrap();
            }
            fs.rmdir(ROOT, b"parent").unwrap();
            let r = fs.unmount();
            done.store(true, Ordering::Relaxed);
            r.unwrap_or_else(|e| panic!("round {round}: {e}"));
            evicted += shrinker.join().unwrap();
        });
        // Nothing is reachable after unmount, from any call.
        assert!(matches!(fs.cache_usage(), Err(Error::Unmounted)));
        assert!(matches!(fs.resolve("/"), Err(Error::Unmounted)));
        assert!(matches!(fs.shrink(), Err(Error::Unmounted)));
        let dev = fs.into_device().unwrap();
        let (report, dev) = daxfs::fsck(dev, false).unwrap();
        assert!(report.is_clean(), "round {round}: {report:?}");
        drop(dev);
    }
    assert!(evicted > 0, "the shrinker evicted something");
}

#[test]
fn references_of_every_kind_keep_an_unlinked_inode_and_block_unmount() {
    let (img, fs) = image(64 << 20);
    // The root's first directory block comes with its first name.
    fs.create(ROOT, b"first", 0o644, 0, 0, true).unwrap();
    let before = fs.statfs();
    let (f, _) = fs.create(ROOT, b"f", 0o644, 0, 0, true).unwrap();
    fs.write(f.ino, 0, &vec![5u8; 1 << 20]).unwrap();
    // A remembered lookup (FUSE's nlookup) and a hold, then the last name
    // goes: the inode stays usable and on the orphan list.
    assert_eq!(fs.lookup_ref(ROOT, b"f").unwrap().ino, f.ino);
    let hold = fs.hold(f.ino).unwrap();
    fs.unlink(ROOT, b"f").unwrap();
    fs.write(f.ino, 0, b"after unlink").unwrap();
    let mut buf = [0u8; 12];
    fs.read(f.ino, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"after unlink");
    let err = fs.unmount().unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY);
    assert!(
        err.to_string()
            .contains(&format!("inode {} (1 lookup, 1 hold)", f.ino)),
        "{err}"
    );
    assert_eq!(fs.forget(f.ino, 2).unwrap_err().errno(), libc::EINVAL);
    fs.forget(f.ino, 1).unwrap();
    assert!(
        fs.statfs().free_blocks < before.free_blocks,
        "held, not freed"
    );
    drop(hold);
    let after = fs.statfs();
    assert_eq!(
        (after.free_blocks, after.free_files),
        (before.free_blocks, before.free_files),
        "the last reference freed it"
    );
    assert_eq!(fs.getattr(f.ino).unwrap_err().errno(), libc::ENOENT);
    // A forced unmount waits for a handle another thread closes.
    let (g, _) = fs.create(ROOT, b"g", 0o644, 0, 0, true).unwrap();
    let h = fs.open(g.ino).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            fs.close(h).unwrap();
        });
        fs.unmount_wait(Duration::from_secs(30)).unwrap();
    });
    drop(fs);
    let fs = mount(&img);
    assert!(fs.mount_notes().is_empty(), "{:?}", fs.mount_notes());
    fs.unmount().unwrap();
}

#[test]
fn the_caches_stay_under_budget_and_answers_stay_right() {
    let _dog = watchdog("cache budget", Duration::from_secs(120));
    let (_img, fs) = image(256 << 20);
    let mut inos = Vec::new();
    for d in 0..10 {
        let dir = fs
            .mkdir(ROOT, format!("d{d}").as_bytes(), 0o755, 0, 0)
            .unwrap()
            .ino;
        for f in 0..300 {
            let name = format!("f{f}");
            let ino = fs
                .create(dir, name.as_bytes(), 0o644, 0, 0, true)
                .unwrap()
                .0
                .ino;
            fs.write(ino, 0, name.as_bytes()).unwrap();
            inos.push((format!("/d{d}/{name}"), ino));
        }
    }
    for (path, ino) in &inos {
        assert_eq!(fs.resolve(path).unwrap(), *ino);
    }
    let full = fs.cache_usage().unwrap();
    assert!(full.inodes > 3000 && full.dentries >= 3000, "{full:?}");
    let budget = full.bytes / 10;
    // Walks keep running while the background shrinker works.
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (path, ino) = &inos[i % inos.len()];
                assert_eq!(fs.resolve(path).unwrap(), *ino, "{path}");
                i += 7;
            }
        });
        fs.set_cache_budget(budget).unwrap();
        // Each pass takes away second chances and evicts; a few settle it.
        let mut usage = fs.cache_usage().unwrap();
        for _ in 0..20 {
            assert!(fs.wait_for_shrinker(Duration::from_secs(30)).unwrap());
            usage = fs.cache_usage().unwrap();
            if usage.bytes <= budget {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(usage.bytes <= budget, "{usage:?} over {budget}");
        assert!(usage.shrinker_passes > 0);
    });
    // Evicted inodes come back from media, right.
    for (path, ino) in inos.iter().step_by(37) {
        let name = path.rsplit('/').next().unwrap();
        assert_eq!(fs.stat_path(path).unwrap().ino, *ino);
        let mut buf = vec![0u8; name.len()];
        fs.read(*ino, 0, &mut buf).unwrap();
        assert_eq!(buf, name.as_bytes());
    }
    fs.unmount().unwrap();
}
