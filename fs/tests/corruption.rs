//! A structure-aware corruption campaign: seeded mutations of every kind of
//! on-media structure (raw bytes, and field edits with the checksum
//! recomputed, 1-3 stacked per image), over images that hold orphans,
//! unreplayed transactions, an overflow extent chain, a large directory,
//! xattrs, long symlinks and hard links. For each image:
//!
//! 1. fsck without repair: no panic, and not one byte of the image changes;
//! 2. mount and walk everything: no panic; `EIO` only where fsck reported
//!    damage, and a mount whenever fsck found the image clean;
//! 3. a write phase (overwrites, appends, new files), then every file read
//!    before is read again: no file changes because another was written;
//! 4. `--repair`: when it says it fixed everything, a check then finds the
//!    image clean, and a second repair changes no byte.
//!
//! `DAXFS_CORRUPT_IMAGES` sets how many images (default 240);
//! `DAXFS_CORRUPT_LONG=1` runs 10,000; `DAXFS_CORRUPT_SEED` replays one;
//! `DAXFS_CORRUPT_VERBOSE=1` prints what each repair left.

mod common;

use common::{Rng, MIB};
use daxfs::format::{Superblock, BLOCK, INODE_SIZE};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, Ino, ROOT};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Where each kind of structure lies in a base image.
#[derive(Clone, Debug, Default)]
struct Map {
    sb: Option<Superblock>,
    /// Allocated inodes, and a few unused slots.
    inodes: Vec<Ino>,
    unused: Vec<Ino>,
    /// (device offset of a directory block, its directory)
    dir_blocks: Vec<u64>,
    extent_blocks: Vec<u64>,
    xattr_blocks: Vec<u64>,
    symlink_blocks: Vec<u64>,
}

/// A base image: its bytes and where its structures are.
struct Base {
    bytes: Vec<u8>,
    map: Map,
}

fn file_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8 ^ seed).collect()
}

/// Build a tree on `fs`. With `live`, the image is copied while mounted:
/// an open, unlinked file is on the orphan list and the journal holds
/// transactions to replay.
fn base(dir: &Path, live: bool) -> Base {
    let path = dir.join(format!("base-{live}.img"));
    let fs = Fs::format(Device::create(&path, 32 * MIB, &DeviceOptions::new()).unwrap()).unwrap();
    let big = fs.mkdir_path("/big", 0o755).unwrap().ino;
    for i in 0..300 {
        let (a, _) = fs
            .create(big, format!("n{i:03}").as_bytes(), 0o644, 0, 0, true)
            .unwrap();
        if i % 10 == 0 {
            fs.write(a.ino, 0, &file_bytes(100 + i * 37, i as u8))
                .unwrap();
        }
    }
    let frag = fs.create_path("/frag", 0o644, true).unwrap().ino;
    let other = fs.create_path("/other", 0o644, true).unwrap().ino;
    for i in 0..20u64 {
        fs.write(frag, i * 4096, &file_bytes(4096, i as u8))
            .unwrap();
        fs.write(other, i * 4096, &file_bytes(4096, 100 + i as u8))
            .unwrap();
    }
    fs.mkdir_path("/d", 0o755).unwrap();
    fs.mkdir_path("/d/sub", 0o755).unwrap();
    fs.create_path("/d/sub/f", 0o644, true).unwrap();
    fs.write_path("/d/sub/f", 0, &file_bytes(70_000, 9))
        .unwrap();
    fs.link_path("/d/sub/f", "/d/hard").unwrap();
    fs.symlink_path("/d/short", b"sub/f").unwrap();
    fs.symlink_path("/d/long", "x/".repeat(600).as_bytes())
        .unwrap();
    fs.mknod_path("/d/fifo", libc::S_IFIFO | 0o600, 0).unwrap();
    fs.mknod_path("/d/tty", libc::S_IFCHR | 0o620, libc::makedev(4, 1))
        .unwrap();
    for ino in [frag, big] {
        fs.setxattr(ino, b"user.a", b"one", false, false).unwrap();
        fs.setxattr(ino, b"user.b", &[7u8; 300], false, false)
            .unwrap();
    }
    let mut held = None;
    if live {
        let (a, _) = fs.create(ROOT, b"orphan", 0o644, 0, 0, true).unwrap();
        fs.write(a.ino, 0, &file_bytes(9000, 3)).unwrap();
        held = Some(fs.open(a.ino).unwrap());
        fs.unlink(ROOT, b"orphan").unwrap();
        for i in 0..5 {
            fs.create_path(format!("/late{i}"), 0o644, true).unwrap();
        }
    }
    let bytes = std::fs::read(&path).unwrap();
    if let Some(h) = held {
        fs.close(h).unwrap();
    }
    fs.unmount().unwrap();
    drop(fs);
    // Where things are, as a mount (replayed, in memory) sees them.
    std::fs::write(&path, &bytes).unwrap();
    let dev = Device::open(&path, &DeviceOptions::new().read_only(true)).unwrap();
    let fs = Fs::mount(dev).unwrap();
    let sb = fs.superblock().clone();
    let mut map = Map {
        sb: Some(sb.clone()),
        ..Map::default()
    };
    let mut raw = [0u8; INODE_SIZE as usize];
    for ino in 1..=sb.inode_count {
        fs.device().read(sb.inode_offset(ino), &mut raw).unwrap();
        if raw[..4] != [0; 4] {
            map.inodes.push(ino);
            let inode = daxfs::format::Inode::decode_unchecked(&raw);
            if inode.xattr_block != 0 {
                map.xattr_blocks.push(inode.xattr_block * BLOCK);
            }
            if inode.extent_block != 0 {
                map.extent_blocks.push(inode.extent_block * BLOCK);
            }
            let extents = fs.file_extents(ino).unwrap_or_default();
            let blocks = extents
                .iter()
                .flat_map(|e| (0..e.len / BLOCK).map(move |i| e.device_offset + i * BLOCK));
            match inode.kind() {
                libc::S_IFDIR => map.dir_blocks.extend(blocks),
                libc::S_IFLNK => map.symlink_blocks.extend(blocks),
                _ => {}
            }
        } else if map.unused.len() < 8 && ino % 97 == 0 {
            map.unused.push(ino);
        }
    }
    Base { bytes, map }
}

/// One mutation of `image`; says what it did.
fn mutate(rng: &mut Rng, image: &mut [u8], map: &Map) -> String {
    let sb = map.sb.as_ref().unwrap();
    let size = image.len() as u64;
    let journal = sb.journal_start * BLOCK;
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    // (name, start, length) of each kind of structure.
    let pick_in = |rng: &mut Rng, v: &[u64]| rng.pick(v).copied();
    let inode_at = |ino: Ino| sb.inode_offset(ino);
    let kinds: Vec<(&str, Option<u64>, u64)> = vec![
        ("superblock", Some(0), 512),
        ("backup superblock", Some(size - BLOCK), 512),
        ("state block", Some(sb.state_block * BLOCK), 16),
        ("journal header", Some(journal), 128),
        ("journal ring", Some(journal + BLOCK), 64 * 1024),
        ("inode", pick_in(rng, &map.inodes).map(inode_at), INODE_SIZE),
        (
            "unused inode",
            pick_in(rng, &map.unused).map(inode_at),
            INODE_SIZE,
        ),
        ("bitmap", Some(sb.bitmap_start * BLOCK), BLOCK),
        ("bitmap checksums", Some(sb.bitmap_csum * BLOCK), 64),
        ("directory block", pick_in(rng, &map.dir_blocks), BLOCK),
        ("extent block", pick_in(rng, &map.extent_blocks), BLOCK),
        ("xattr block", pick_in(rng, &map.xattr_blocks), 512),
        ("symlink block", pick_in(rng, &map.symlink_blocks), 1200),
    ];
    let (kind, start, len) = loop {
        let (kind, start, len) = *rng.pick(&kinds).unwrap();
        if let Some(start) = start {
            break (kind, start, len);
        }
    };
    let start = start as usize;
    if rng.chance(50) {
        // Raw damage: bits flipped, or a run of bytes overwritten.
        let at = start + rng.below(len) as usize;
        if rng.chance(60) {
            for _ in 0..rng.range(1, 8) {
                let bit = rng.below(8);
                let at = start + rng.below(len) as usize;
                image[at] ^= 1 << bit;
            }
            return format!("{kind} @{at:#x}: bits flipped");
        }
        let run = (rng.range(1, 64) as usize).min(start + len as usize - at);
        let byte = rng.below(256) as u8;
        image[at..at + run].fill(byte);
        return format!("{kind} @{at:#x}: {run} bytes of {byte:#x}");
    }
    // A field edit, the checksum recomputed: what checksums cannot catch.
    let value = |rng: &mut Rng| match rng.below(5) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => rng.below(1 << 20),
        _ => rng.next(),
    };
    let put = |image: &mut [u8], at: usize, width: usize, v: u64| {
        image[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
    };
    let crc = |b: &[u8]| crc32c::crc32c(b);
    match kind {
        "superblock" | "backup superblock" => {
            let field = 16 + 8 * rng.below(18) as usize;
            let v = value(rng);
            put(image, start + field, 8, v);
            let c = crc(&image[start..start + 508]);
            put(image, start + 508, 4, c as u64);
            format!("{kind}: field @{field} = {v:#x}")
        }
        "state block" => {
            let v = if rng.chance(50) {
                *rng.pick(&map.inodes).unwrap()
            } else {
                value(rng)
            };
            put(image, start, 8, v);
            let c = crc(&image[start..start + 12]);
            put(image, start + 12, 4, c as u64);
            format!("orphan head = {v}")
        }
        "inode" | "unused inode" => {
            const FIELDS: [(usize, usize); 16] = [
                (0, 4),
                (4, 4),
                (16, 8),
                (60, 4),
                (68, 4),
                (72, 8),
                (80, 8),
                (88, 8),
                (96, 8),
                (104, 8),
                (112, 4),
                (116, 4),
                (120, 8),
                (136, 8),
                (152, 8),
                (168, 8),
            ];
            let (field, width) = *rng.pick(&FIELDS).unwrap();
            let mut v = value(rng);
            if field >= 120 && field % 16 == 8 && rng.chance(50) {
                // An extent pointed into another structure's blocks.
                v = rng.pick(&map.dir_blocks).map_or(v, |b| b / BLOCK);
            }
            if field == 96 || (field == 88 && rng.chance(50)) {
                v = *rng.pick(&map.inodes).unwrap();
            }
            put(image, start + field, width, v);
            let c = crc(&image[start..start + 252]);
            put(image, start + 252, 4, c as u64);
            format!("{kind} @{start:#x}: field @{field} = {v:#x}")
        }
        "bitmap" => {
            let at = start + rng.below(len) as usize;
            image[at] = rng.below(256) as u8;
            let piece = (at - start) / 512;
            let from = start + piece * 512;
            let crc = daxfs::format::bitmap_crc(piece as u64, &image[from..from + 512]);
            let table = (sb.bitmap_csum * BLOCK) as usize;
            put(image, table + piece * 4, 4, crc as u64);
            format!("bitmap byte @{at:#x} changed, its checksum recomputed")
        }
        "directory block" => {
            // An entry's field, its checksum recomputed (a used slot).
            let slot = (0..128)
                .map(|_| start + 32 * rng.below(128) as usize)
                .find(|&at| u64_at(image, at) != 0);
            let Some(at) = slot else {
                return format!("{kind} @{start:#x}: no entry found to edit");
            };
            let n = (image[at + 10] as usize).clamp(1, 8);
            match rng.below(4) {
                0 => {
                    let v = if rng.chance(50) {
                        *rng.pick(&map.inodes).unwrap()
                    } else {
                        value(rng)
                    };
                    put(image, at, 8, v)
                }
                1 => image[at + 9] = rng.below(16) as u8,
                2 => image[at + 16] = *rng.pick(b"/\0.x").unwrap(),
                _ => image[at + 8] = rng.below(40) as u8,
            }
            if at + n * 32 <= start + BLOCK as usize {
                put(image, at + 12, 4, 0);
                let c = crc(&image[at..at + n * 32]);
                put(image, at + 12, 4, c as u64);
            }
            format!("{kind}: entry @{at:#x} edited, checksum recomputed")
        }
        "extent block" => {
            let field = *rng.pick(&[4usize, 8, 32, 36, 40, 56]).unwrap();
            let width = if field == 8 || field % 16 == 8 { 8 } else { 4 };
            let v = value(rng);
            put(image, start + field, width, v);
            put(image, start + 16, 4, 0);
            let c = crc(&image[start..start + BLOCK as usize]);
            put(image, start + 16, 4, c as u64);
            format!("{kind}: field @{field} = {v:#x}")
        }
        "xattr block" => {
            let field = *rng.pick(&[4usize, 8, 16, 17, 20]).unwrap();
            image[start + field] = rng.below(256) as u8;
            let used = (u32::from_le_bytes(image[start + 8..start + 12].try_into().unwrap())
                as usize)
                .clamp(16, BLOCK as usize);
            let c = crc32c::crc32c_append(
                crc32c::crc32c(&image[start..start + 12]),
                &image[start + 16..start + used],
            );
            put(image, start + 12, 4, c as u64);
            format!("{kind}: byte @{field} edited, checksum recomputed")
        }
        _ => {
            let at = start + rng.below(len) as usize;
            image[at] ^= 0x5a;
            format!("{kind} @{at:#x}: byte changed")
        }
    }
}

/// What one image came to.
#[derive(Debug, Default)]
struct Tally {
    fsck_clean: u64,
    fsck_problems: u64,
    fsck_refused: u64,
    mounted: u64,
    mount_refused: u64,
    repaired: u64,
    repair_partial: u64,
    repair_refused: u64,
    eio_seen: u64,
}

/// Everything readable under `dir`: path -> contents.
fn walk(
    fs: &Fs,
    dir: Ino,
    prefix: &str,
    depth: u32,
    files: &mut BTreeMap<String, (Ino, Vec<u8>)>,
    eio: &mut Vec<String>,
) {
    let note = |e: daxfs::Error, what: String, eio: &mut Vec<String>| {
        if e.errno() == libc::EIO {
            eio.push(format!("{what}: {e}"));
        }
    };
    let entries = match fs.readdir(dir, 2) {
        Ok(entries) => entries,
        Err(e) => return note(e, format!("readdir {prefix}/"), eio),
    };
    for e in entries.into_iter().take(400) {
        let path = format!("{prefix}/{}", String::from_utf8_lossy(&e.name));
        let attr = match fs.getattr(e.ino) {
            Ok(a) => a,
            Err(err) => {
                note(err, format!("getattr {path}"), eio);
                continue;
            }
        };
        if let Err(err) = fs.listxattr(e.ino) {
            note(err, format!("listxattr {path}"), eio);
        }
        match attr.kind {
            daxfs::FileKind::Dir if depth < 6 && e.ino != dir => {
                walk(fs, e.ino, &path, depth + 1, files, eio)
            }
            daxfs::FileKind::Symlink => {
                if let Err(err) = fs.readlink(e.ino) {
                    note(err, format!("readlink {path}"), eio);
                }
            }
            daxfs::FileKind::File if attr.size <= 4 << 20 => {
                let mut buf = vec![0u8; attr.size as usize];
                match fs.read(e.ino, 0, &mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        files.insert(path, (e.ino, buf));
                    }
                    Err(err) => note(err, format!("read {path}"), eio),
                }
            }
            _ => {}
        }
    }
}

fn run_image(seed: u64, base: &Base, path: &Path, tally: &mut Tally) -> Result<(), String> {
    let mut rng = Rng(seed);
    let mut image = base.bytes.clone();
    let mut what = Vec::new();
    for _ in 0..rng.range(1, 3) {
        what.push(mutate(&mut rng, &mut image, &base.map));
    }
    let what = what.join("; ");
    std::fs::write(path, &image).unwrap();
    let _ = std::fs::remove_file(path.with_extension("img.badblocks"));
    let fail = |why: String| Err(format!("{why}\n  mutations: {what}"));
    let open = || Device::open(path, &DeviceOptions::new()).unwrap();
    // 1. A check: no panic, no change.
    let checked = catch_unwind(AssertUnwindSafe(|| daxfs::fsck(open(), false).map(|r| r.0)));
    let Ok(checked) = checked else {
        return fail("fsck panicked".into());
    };
    if std::fs::read(path).unwrap() != image {
        return fail("fsck without --repair changed the image".into());
    }
    let clean = match &checked {
        Ok(report) if report.is_clean() => {
            tally.fsck_clean += 1;
            true
        }
        Ok(_) => {
            tally.fsck_problems += 1;
            false
        }
        Err(_) => {
            tally.fsck_refused += 1;
            false
        }
    };
    // 2-3. Mount, walk, write, re-read.
    let used = catch_unwind(AssertUnwindSafe(|| -> Result<bool, String> {
        let fs = match Fs::mount(open()) {
            Ok(fs) => fs,
            Err(e) if clean => return Err(format!("fsck found it clean, mount refused: {e}")),
            Err(_) => return Ok(false),
        };
        let mut files = BTreeMap::new();
        let mut eio = Vec::new();
        walk(&fs, ROOT, "", 0, &mut files, &mut eio);
        if clean && !eio.is_empty() {
            return Err(format!("EIO where fsck found nothing: {eio:?}"));
        }
        if !eio.is_empty() {
            tally.eio_seen += 1;
        }
        // Writes: overwrite and extend some files, make new ones. What
        // each inode should hold (hard links share it); `None`: a write to
        // it failed part-way, so it is not compared.
        // What each inode should read as, byte by byte (hard links share
        // it); `None` where nothing is known: the gap a write past the end
        // leaves reads as zeros on a sound file, but past a size cut short
        // by the damage it holds what the blocks held. A file whose write
        // failed part-way is not compared.
        let mut expect: BTreeMap<Ino, Option<Vec<Option<u8>>>> = files
            .values()
            .map(|(ino, d)| (*ino, Some(d.iter().map(|&b| Some(b)).collect())))
            .collect();
        let inos: Vec<Ino> = expect.keys().copied().collect();
        for k in 0..4 {
            let Some(&ino) = rng.pick(&inos) else { break };
            let data = file_bytes(rng.range(1, 20_000) as usize, k as u8 + 40);
            let at = rng.below(30_000) as usize;
            match fs.write(ino, at as u64, &data) {
                Ok(n) if n == data.len() => {
                    if let Some(Some(known)) = expect.get_mut(&ino) {
                        let end = at + data.len();
                        if known.len() < end {
                            known.resize(end, None);
                        }
                        for (slot, &b) in known[at..end].iter_mut().zip(&data) {
                            *slot = Some(b);
                        }
                    }
                }
                _ => {
                    expect.insert(ino, None);
                }
            }
        }
        for k in 0..3 {
            if let Ok(a) = fs.create(ROOT, format!("new{k}").as_bytes(), 0o644, 0, 0, true) {
                let _ = fs.write(a.0.ino, 0, &file_bytes(rng.range(1, 300_000) as usize, 77));
            }
        }
        for (p, (ino, _)) in &files {
            let Some(Some(known)) = expect.get(ino) else {
                continue;
            };
            let mut buf = vec![0u8; known.len() + 1];
            let n = fs
                .read(*ino, 0, &mut buf)
                .map_err(|e| format!("re-read {p}: {e}"))?;
            let same = n == known.len()
                && known
                    .iter()
                    .zip(&buf)
                    .all(|(want, got)| want.is_none_or(|w| w == *got));
            if !same {
                return Err(format!(
                    "{p} (inode {ino}) changed though it was not written (or differs from what was)"
                ));
            }
        }
        let _ = fs.unmount();
        Ok(true)
    }));
    match used {
        Err(_) => return fail("mount, walk or write panicked".into()),
        Ok(Err(why)) => return fail(why),
        Ok(Ok(true)) => tally.mounted += 1,
        Ok(Ok(false)) => tally.mount_refused += 1,
    }
    // 4. Repair, then check; a second repair changes nothing.
    let repaired = catch_unwind(AssertUnwindSafe(|| daxfs::fsck(open(), true).map(|r| r.0)));
    let Ok(repaired) = repaired else {
        return fail("fsck --repair panicked".into());
    };
    match repaired {
        Err(_) => tally.repair_refused += 1,
        Ok(report) if report.exit_code() == 4 => {
            tally.repair_partial += 1;
            if std::env::var("DAXFS_CORRUPT_VERBOSE").is_ok() {
                let left: Vec<&str> = report
                    .problems
                    .iter()
                    .filter(|p| !p.fixed)
                    .map(|p| p.what.as_str())
                    .collect();
                eprintln!("seed {seed}: not repaired: {left:?}\n  mutations: {what}");
                if std::env::var("DAXFS_CORRUPT_VERBOSE").as_deref() == Ok("2") {
                    eprintln!("{report:#?}");
                }
            }
        }
        Ok(report) => {
            tally.repaired += 1;
            let after = daxfs::fsck(open(), false)
                .map(|r| r.0)
                .map_err(|e| format!("after repair: {e}"));
            match after {
                Ok(after) if after.is_clean() => {}
                Ok(after) => {
                    return fail(format!(
                        "the repair said it fixed everything ({:?}); a check then found {:?}",
                        report.problems, after.problems
                    ))
                }
                Err(e) => return fail(e),
            }
            let before = std::fs::read(path).unwrap();
            let again = daxfs::fsck(open(), true)
                .map(|r| r.0)
                .map_err(|e| e.to_string());
            if !again.as_ref().is_ok_and(|r| r.is_clean()) || std::fs::read(path).unwrap() != before
            {
                return fail(format!("a second repair was not a no-op: {again:?}"));
            }
        }
    }
    Ok(())
}

#[test]
fn structure_aware_corruption_campaign() {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-corrupt")
        .tempdir_in("/dev/shm")
        .unwrap();
    let bases = [base(dir.path(), false), base(dir.path(), true)];
    let count: u64 = if std::env::var("DAXFS_CORRUPT_LONG").is_ok_and(|v| v == "1") {
        10_000
    } else {
        std::env::var("DAXFS_CORRUPT_IMAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(240)
    };
    let seeds = match std::env::var("DAXFS_CORRUPT_SEED") {
        Ok(s) => {
            let s: u64 = s.parse().expect("DAXFS_CORRUPT_SEED is a number");
            s..s + 1
        }
        Err(_) => 0..count,
    };
    let path = dir.path().join("damaged.img");
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for seed in seeds {
        let base = &bases[(seed % 2) as usize];
        if let Err(why) = run_image(seed, base, &path, &mut tally) {
            failures.push(format!("seed {seed}: {why}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    eprintln!("{tally:#?}");
    assert!(
        failures.is_empty(),
        "{}\nreplay: DAXFS_CORRUPT_SEED=N cargo test -p daxfs --test corruption",
        failures.join("\n")
    );
    assert!(
        tally.fsck_problems + tally.fsck_refused > tally.fsck_clean / 4,
        "the mutations mostly do damage: {tally:?}"
    );
}
