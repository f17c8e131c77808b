//! Crash consistency at depth: seeded random sequences of 1,000 and more
//! operations (creates, writes of 4 KiB to 3 MiB, appends, xattrs of every
//! size class, mkdir and rmdir of directories that grow past one block,
//! renames, unlinks, truncates, fallocate and punch, fsyncs) run on a
//! crash-tracking device, so that blocks are freed and reused, as metadata
//! and as file data, again and again, and the journal wraps many times.
//!
//! At sampled fences across the whole sequence, the images a crash there
//! could leave are built: the process crash (every store reached the
//! device: the daemon was killed), the power failure that loses every
//! pending line, and random mixes of pending lines. Each must pass fsck
//! without a problem, mount, and show the state before the operation in
//! flight or after it, exactly: every byte of every file (so every file
//! fsync'd before the crash has its bytes), every name, every xattr. Only
//! an overwrite in flight may show a mix of its old and new bytes (file
//! data is written in place, as on any filesystem).
//!
//! The expected states come from a model: the sequence is applied to a
//! simple in-memory tree first.
//!
//! * `DAXFS_CRASH_SEED=N` replays one seed (a failure prints its command).
//! * `DAXFS_CRASH_LONG=1` runs the long mode: more seeds, longer
//!   sequences, every fence, more mixes (over 100,000 crash states).

mod common;

use common::{crash_units, Rng};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{FileKind, Fs, Ino, RenameFlags, ROOT};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const DEVICE: u64 = 32 << 20;
/// File data the sequence keeps under.
const DATA_CAP: u64 = 12 << 20;
const NOT_STARTED: usize = usize::MAX;

/// `len` bytes that depend on `fill` (never all zeros).
fn bytes(fill: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng(fill);
    let mut out = Vec::with_capacity(len as usize + 8);
    while (out.len() as u64) < len {
        out.extend_from_slice(&(rng.next() | 1).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

// ---- the model --------------------------------------------------------------

type Xattrs = BTreeMap<Vec<u8>, Arc<Vec<u8>>>;

#[derive(Clone, Debug, PartialEq)]
enum Node {
    File { data: Arc<Vec<u8>>, xattrs: Xattrs },
    Dir { xattrs: Xattrs },
}

impl Node {
    fn xattrs(&self) -> &Xattrs {
        match self {
            Node::File { xattrs, .. } | Node::Dir { xattrs } => xattrs,
        }
    }

    fn xattrs_mut(&mut self) -> &mut Xattrs {
        match self {
            Node::File { xattrs, .. } | Node::Dir { xattrs } => xattrs,
        }
    }
}

/// Every path (`/a/b`) and what it is.
type Tree = BTreeMap<String, Node>;

#[derive(Clone, Debug)]
enum Op {
    Create(String),
    Write {
        path: String,
        offset: u64,
        len: u64,
        fill: u64,
    },
    Truncate(String, u64),
    Fallocate {
        path: String,
        offset: u64,
        len: u64,
        keep_size: bool,
    },
    Punch {
        path: String,
        offset: u64,
        len: u64,
    },
    SetXattr {
        path: String,
        name: Vec<u8>,
        len: u64,
        fill: u64,
    },
    RemoveXattr(String, Vec<u8>),
    Mkdir(String),
    Rmdir(String),
    Unlink(String),
    Rename(String, String),
    Fsync(String),
}

impl Op {
    /// Whether a crash in the middle may show a mix of old and new bytes
    /// of the file it writes.
    fn overwrites_in_place(&self) -> Option<&str> {
        match self {
            Op::Write { path, .. } => Some(path),
            _ => None,
        }
    }
}

fn files(tree: &Tree) -> Vec<String> {
    tree.iter()
        .filter(|(_, n)| matches!(n, Node::File { .. }))
        .map(|(p, _)| p.clone())
        .collect()
}

fn dirs(tree: &Tree) -> Vec<String> {
    std::iter::once(String::new())
        .chain(
            tree.iter()
                .filter(|(_, n)| matches!(n, Node::Dir { .. }))
                .map(|(p, _)| p.clone()),
        )
        .collect()
}

fn children<'a>(tree: &'a Tree, dir: &str) -> impl Iterator<Item = &'a String> {
    let prefix = format!("{dir}/");
    tree.range(prefix.clone()..)
        .take_while(move |(p, _)| p.starts_with(&prefix))
        .map(|(p, _)| p)
}

fn size_of(tree: &Tree, path: &str) -> u64 {
    match &tree[path] {
        Node::File { data, .. } => data.len() as u64,
        Node::Dir { .. } => 0,
    }
}

fn data_total(tree: &Tree) -> u64 {
    tree.values()
        .map(|n| match n {
            Node::File { data, .. } => data.len() as u64,
            Node::Dir { .. } => 0,
        })
        .sum()
}

/// Bytes the xattrs take in their block.
fn xattr_bytes(x: &Xattrs) -> u64 {
    16 + x.iter().map(|(n, v)| 3 + n.len() + v.len()).sum::<usize>() as u64
}

fn new_name(rng: &mut Rng, tree: &Tree, dir: &str) -> String {
    loop {
        // Long names make directories grow past one block quickly.
        let len = if rng.chance(30) {
            rng.range(100, 230)
        } else {
            rng.range(1, 12)
        };
        let name: String = (0..len)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        let path = format!("{dir}/{name}");
        if !tree.contains_key(&path) {
            return path;
        }
    }
}

/// A data length: mostly small, sometimes up to 3 MiB.
fn data_len(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0 => rng.range(1 << 20, 3 << 20),
        1..=3 => rng.range(64 << 10, 512 << 10),
        _ => rng.range(1, 64 << 10),
    }
}

/// An operation that is valid in `tree`.
fn generate(rng: &mut Rng, tree: &Tree) -> Op {
    let files = files(tree);
    let dirs = dirs(tree);
    let full = data_total(tree) > DATA_CAP;
    loop {
        let op = match rng.below(100) {
            0..=17 => {
                let dir = rng.pick(&dirs).unwrap().clone();
                Some(Op::Create(new_name(rng, tree, &dir)))
            }
            18..=33 if !full => rng.pick(&files).map(|f| {
                let size = size_of(tree, f);
                let offset = match rng.below(4) {
                    0 => size,                          // append
                    1 => size + rng.range(1, 64 << 10), // past the end: a hole
                    _ => rng.below(size + 1),           // over existing bytes
                };
                Op::Write {
                    path: f.clone(),
                    offset,
                    len: data_len(rng),
                    fill: rng.next(),
                }
            }),
            34..=39 => rng.pick(&files).map(|f| {
                let size = size_of(tree, f);
                let new = if rng.chance(60) || full {
                    rng.below(size + 1)
                } else {
                    size + rng.below(1 << 20)
                };
                Op::Truncate(f.clone(), new)
            }),
            40..=43 if !full => rng.pick(&files).map(|f| Op::Fallocate {
                path: f.clone(),
                offset: rng.below(size_of(tree, f) + (1 << 20)),
                len: data_len(rng),
                keep_size: rng.chance(50),
            }),
            44..=48 => rng.pick(&files).map(|f| {
                let size = size_of(tree, f);
                Op::Punch {
                    path: f.clone(),
                    offset: rng.below(size + 1),
                    len: rng.range(1, (size / 2).max(8192)),
                }
            }),
            49..=56 => {
                let all: Vec<&String> = tree.keys().collect();
                rng.pick(&all).and_then(|p| {
                    let class = rng.below(3);
                    let name = format!("user.{}", ["s", "m", "l"][class as usize]).into_bytes();
                    let len = match class {
                        0 => rng.range(0, 32),
                        1 => rng.range(100, 600),
                        _ => rng.range(1200, 3000),
                    };
                    let mut after = tree[*p].xattrs().clone();
                    after.insert(name.clone(), Arc::new(vec![0; len as usize]));
                    (xattr_bytes(&after) <= 4096).then(|| Op::SetXattr {
                        path: (*p).clone(),
                        name,
                        len,
                        fill: rng.next(),
                    })
                })
            }
            57..=59 => {
                let with: Vec<(String, Vec<u8>)> = tree
                    .iter()
                    .flat_map(|(p, n)| n.xattrs().keys().map(move |k| (p.clone(), k.clone())))
                    .collect();
                rng.pick(&with)
                    .map(|(p, n)| Op::RemoveXattr(p.clone(), n.clone()))
            }
            60..=64 => {
                let shallow: Vec<&String> =
                    dirs.iter().filter(|d| d.matches('/').count() < 3).collect();
                rng.pick(&shallow)
                    .map(|d| Op::Mkdir(new_name(rng, tree, d)))
            }
            65..=68 => {
                let empty: Vec<&String> = dirs
                    .iter()
                    .filter(|d| !d.is_empty() && children(tree, d).next().is_none())
                    .collect();
                rng.pick(&empty).map(|d| Op::Rmdir((*d).clone()))
            }
            69..=80 => {
                // Half the time from the fullest directory, so that large
                // directories empty out and go too.
                let pool: Vec<String> = if rng.chance(50) {
                    let fullest = dirs
                        .iter()
                        .max_by_key(|d| children(tree, d).count())
                        .unwrap();
                    children(tree, fullest)
                        .filter(|p| matches!(tree[*p], Node::File { .. }))
                        .cloned()
                        .collect()
                } else {
                    files.clone()
                };
                rng.pick(&pool).map(|f| Op::Unlink(f.clone()))
            }
            81..=90 => {
                if rng.chance(80) {
                    rng.pick(&files).map(|from| {
                        let to = match rng.pick(&files) {
                            Some(over) if over != from && rng.chance(40) => over.clone(),
                            _ => {
                                let dir = rng.pick(&dirs).unwrap().clone();
                                new_name(rng, tree, &dir)
                            }
                        };
                        Op::Rename(from.clone(), to)
                    })
                } else {
                    let movable: Vec<&String> = dirs.iter().filter(|d| !d.is_empty()).collect();
                    rng.pick(&movable).and_then(|from| {
                        let into = rng.pick(&dirs).unwrap().clone();
                        let inside = into == **from || into.starts_with(&format!("{from}/"));
                        (!inside && into.matches('/').count() < 3)
                            .then(|| Op::Rename((*from).clone(), new_name(rng, tree, &into)))
                    })
                }
            }
            _ => rng.pick(&files).map(|f| Op::Fsync(f.clone())),
        };
        if let Some(op) = op {
            return op;
        }
    }
}

/// Apply `op` to the model.
fn apply_model(tree: &mut Tree, op: &Op) {
    let file = |tree: &mut Tree, path: &str| -> Vec<u8> {
        match &tree[path] {
            Node::File { data, .. } => data.as_ref().clone(),
            Node::Dir { .. } => unreachable!("a file op on a directory"),
        }
    };
    let set = |tree: &mut Tree, path: &str, new: Vec<u8>| {
        if let Some(Node::File { data, .. }) = tree.get_mut(path) {
            *data = Arc::new(new);
        }
    };
    match op {
        Op::Create(p) => {
            tree.insert(
                p.clone(),
                Node::File {
                    data: Arc::default(),
                    xattrs: Xattrs::new(),
                },
            );
        }
        Op::Write {
            path,
            offset,
            len,
            fill,
        } => {
            let mut d = file(tree, path);
            let end = (offset + len) as usize;
            if d.len() < end {
                d.resize(end, 0);
            }
            d[*offset as usize..end].copy_from_slice(&bytes(*fill, *len));
            set(tree, path, d);
        }
        Op::Truncate(path, size) => {
            let mut d = file(tree, path);
            d.resize(*size as usize, 0);
            set(tree, path, d);
        }
        Op::Fallocate {
            path,
            offset,
            len,
            keep_size,
        } => {
            let mut d = file(tree, path);
            if !keep_size && d.len() < (offset + len) as usize {
                d.resize((offset + len) as usize, 0);
                set(tree, path, d);
            }
        }
        Op::Punch { path, offset, len } => {
            let mut d = file(tree, path);
            let end = ((offset + len) as usize).min(d.len());
            if (*offset as usize) < end {
                d[*offset as usize..end].fill(0);
            }
            set(tree, path, d);
        }
        Op::SetXattr {
            path,
            name,
            len,
            fill,
        } => {
            let node = tree.get_mut(path).unwrap();
            node.xattrs_mut()
                .insert(name.clone(), Arc::new(bytes(*fill, *len)));
        }
        Op::RemoveXattr(path, name) => {
            tree.get_mut(path).unwrap().xattrs_mut().remove(name);
        }
        Op::Mkdir(p) => {
            tree.insert(
                p.clone(),
                Node::Dir {
                    xattrs: Xattrs::new(),
                },
            );
        }
        Op::Rmdir(p) | Op::Unlink(p) => {
            tree.remove(p);
        }
        Op::Rename(from, to) => {
            let moved: Vec<String> = std::iter::once(from.clone())
                .chain(children(tree, from).cloned())
                .collect();
            for old in moved {
                let node = tree.remove(&old).unwrap();
                tree.insert(format!("{to}{}", &old[from.len()..]), node);
            }
        }
        Op::Fsync(_) => {}
    }
}

/// Apply `op` to the filesystem.
fn apply_fs(fs: &Fs, op: &Op) -> daxfs::Result<()> {
    let ino = |p: &str| fs.resolve(p);
    match op {
        Op::Create(p) => fs.create_path(p, 0o644, true).map(drop),
        Op::Write {
            path,
            offset,
            len,
            fill,
        } => fs.write(ino(path)?, *offset, &bytes(*fill, *len)).map(drop),
        Op::Truncate(path, size) => fs.truncate(ino(path)?, *size),
        Op::Fallocate {
            path,
            offset,
            len,
            keep_size,
        } => fs.fallocate(ino(path)?, *offset, *len, *keep_size),
        Op::Punch { path, offset, len } => fs.punch_hole(ino(path)?, *offset, *len),
        Op::SetXattr {
            path,
            name,
            len,
            fill,
        } => fs.setxattr(ino(path)?, name, &bytes(*fill, *len), false, false),
        Op::RemoveXattr(path, name) => fs.removexattr(ino(path)?, name),
        Op::Mkdir(p) => fs.mkdir_path(p, 0o755).map(drop),
        Op::Rmdir(p) => fs.rmdir_path(p),
        Op::Unlink(p) => fs.unlink_path(p),
        Op::Rename(from, to) => fs.rename_path(from, to, RenameFlags::default()),
        Op::Fsync(p) => fs.fsync(ino(p)?),
    }
}

/// The filesystem's visible tree, in the model's terms.
fn observe(fs: &Fs) -> Result<Tree, String> {
    let mut tree = Tree::new();
    walk(fs, ROOT, "", &mut tree).map_err(|e| e.to_string())?;
    Ok(tree)
}

fn walk(fs: &Fs, dir: Ino, prefix: &str, tree: &mut Tree) -> daxfs::Result<()> {
    for e in fs.readdir(dir, 2)? {
        let path = format!("{prefix}/{}", String::from_utf8_lossy(&e.name));
        let mut xattrs = Xattrs::new();
        for name in fs.listxattr(e.ino)? {
            let value = fs.getxattr(e.ino, &name)?;
            xattrs.insert(name, Arc::new(value));
        }
        let node = match e.kind {
            FileKind::Dir => {
                walk(fs, e.ino, &path, tree)?;
                Node::Dir { xattrs }
            }
            _ => {
                let mut data = vec![0u8; fs.getattr(e.ino)?.size as usize];
                let n = fs.read(e.ino, 0, &mut data)?;
                data.truncate(n);
                Node::File {
                    data: Arc::new(data),
                    xattrs,
                }
            }
        };
        tree.insert(path, node);
    }
    Ok(())
}

/// Whether `seen` is `before` or `after`, or (for an overwrite in flight)
/// a mix of their bytes in the one file it writes; else what differs.
fn matches(seen: &Tree, before: &Tree, after: &Tree, op: &Op) -> Result<(), String> {
    if seen == before || seen == after {
        return Ok(());
    }
    if let Some(path) = op.overwrites_in_place() {
        let same_elsewhere = seen.len() == before.len()
            && seen
                .iter()
                .all(|(p, n)| p == path || before.get(p) == Some(n));
        if let (
            true,
            Some(Node::File { data, xattrs }),
            Some(Node::File {
                data: old,
                xattrs: x,
            }),
            Some(Node::File { data: new, .. }),
        ) = (
            same_elsewhere,
            seen.get(path),
            before.get(path),
            after.get(path),
        ) {
            let byte = |d: &Vec<u8>, i: usize| d.get(i).copied().unwrap_or(0);
            let mixed = (data.len() == old.len() || data.len() == new.len())
                && (0..data.len()).all(|i| data[i] == byte(old, i) || data[i] == byte(new, i));
            if mixed && xattrs == x {
                return Ok(());
            }
        }
    }
    let describe = |t: &Tree, p: &str| match t.get(p) {
        None => "missing".to_string(),
        Some(Node::Dir { xattrs }) => format!("dir, {} xattrs", xattrs.len()),
        Some(Node::File { data, xattrs }) => {
            format!("file of {} bytes, {} xattrs", data.len(), xattrs.len())
        }
    };
    let diffs: Vec<String> = seen
        .keys()
        .chain(before.keys())
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|p| seen.get(*p) != before.get(*p) && seen.get(*p) != after.get(*p))
        .take(4)
        .map(|p| {
            let first_byte = match (seen.get(p), before.get(p)) {
                (Some(Node::File { data: a, .. }), Some(Node::File { data: b, .. })) => a
                    .iter()
                    .zip(b.iter())
                    .position(|(x, y)| x != y)
                    .map(|i| format!(", first differing byte {i}"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            format!(
                "{p}: seen {}, before {}, after {}{first_byte}",
                describe(seen, p),
                describe(before, p),
                describe(after, p)
            )
        })
        .collect();
    Err(format!(
        "the state is neither before nor after the operation: {diffs:?}"
    ))
}

// ---- the run ---------------------------------------------------------------

struct Plan {
    ops: usize,
    /// Percent of fences at which crash images are checked.
    sample: u64,
    /// Random mixes of pending lines per sampled fence (besides "all lost"
    /// and "all persisted").
    mixes: usize,
}

/// The states before and after each operation of seed `seed`.
fn model_run(seed: u64, ops: usize) -> (Vec<Op>, Vec<Tree>) {
    let mut rng = Rng(seed);
    // What a new filesystem holds: /lost+found.
    let mut tree = Tree::from([(
        "/lost+found".to_string(),
        Node::Dir {
            xattrs: Xattrs::new(),
        },
    )]);
    let mut trees = vec![tree.clone()];
    let mut sequence = Vec::with_capacity(ops);
    for _ in 0..ops {
        let op = generate(&mut rng, &tree);
        apply_model(&mut tree, &op);
        sequence.push(op);
        trees.push(tree.clone());
    }
    (sequence, trees)
}

/// Check one crash image: fsck clean, mounts, and shows a state the
/// sequence passed through.
fn check_image(
    image: &[u8],
    path: &std::path::Path,
    before: &Tree,
    after: &Tree,
    op: &Op,
) -> Result<(), String> {
    // The whole image over the checker's own file (its pages stay
    // allocated from one check to the next).
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, image, 0))
        .map_err(|e| format!("cannot write the image: {e}"))?;
    let dev = Device::open(path, &DeviceOptions::new()).map_err(|e| e.to_string())?;
    let (report, dev) = daxfs::fsck(dev, false).map_err(|e| format!("fsck cannot check: {e}"))?;
    if !report.is_clean() {
        return Err(format!("fsck: {:?}", report.problems));
    }
    let fs = Fs::mount(dev).map_err(|e| format!("does not mount: {e}"))?;
    let seen = observe(&fs)?;
    fs.unmount().map_err(|e| e.to_string())?;
    matches(&seen, before, after, op)
}

/// A crash image to check: the bytes, the operation in flight, and how
/// the image was made (for the failure message).
struct Job {
    image: Vec<u8>,
    op: usize,
    fence: u64,
    kind: String,
}

/// Run seed `seed` under `plan`; returns how many crash states were checked.
/// The workload thread builds the images at its fences; checker threads
/// (one per core) check them.
fn run_seed(seed: u64, plan: &Plan) -> u64 {
    let (ops, trees) = model_run(seed, plan.ops);
    let (ops, trees) = (Arc::new(ops), Arc::new(trees));
    let dir = tempfile::Builder::new()
        .prefix("daxfs-crashseq")
        .tempdir_in("/dev/shm")
        .unwrap();
    let dev = Device::create(
        dir.path().join("tracked.img"),
        DEVICE,
        &DeviceOptions::new().crash_tracking(true),
    )
    .unwrap();
    let fs = Fs::format(dev).unwrap();
    let in_flight = Arc::new(AtomicUsize::new(NOT_STARTED));
    let checked = Arc::new(AtomicU64::new(0));
    let failure = Arc::new(Mutex::new(None::<String>));
    // Image buffers go round: the workload thread fills one, a checker
    // checks it and gives it back. Four in all: each is the whole device.
    let (queue, jobs) = std::sync::mpsc::sync_channel::<Job>(4);
    let jobs = Arc::new(Mutex::new(jobs));
    let (give_back, buffers) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..4 {
        give_back.send(Vec::new()).unwrap();
    }
    let checkers: Vec<_> = (0..std::thread::available_parallelism().map_or(2, |n| n.get()))
        .map(|i| {
            let (jobs, failure, checked, ops, trees, give_back) = (
                jobs.clone(),
                failure.clone(),
                checked.clone(),
                ops.clone(),
                trees.clone(),
                give_back.clone(),
            );
            let scratch = dir.path().join(format!("crash{i}.img"));
            std::thread::spawn(move || loop {
                let job = jobs.lock().unwrap().recv();
                let Ok(job) = job else { return };
                checked.fetch_add(1, Ordering::Relaxed);
                let k = job.op;
                if let Err(e) = check_image(&job.image, &scratch, &trees[k], &trees[k + 1], &ops[k])
                {
                    failure.lock().unwrap().get_or_insert(format!(
                        "operation {k} ({:?}), fence {}, {}: {e}",
                        ops[k], job.fence, job.kind
                    ));
                }
                let _ = give_back.send(job.image);
            })
        })
        .collect();
    // Only the checkers give buffers back: if they all die, the workload
    // thread's wait for a buffer ends.
    drop(give_back);
    {
        let (in_flight, failure) = (in_flight.clone(), failure.clone());
        let mut rng = Rng(seed ^ 0x5eed_f00d);
        let (sample, mixes) = (plan.sample, plan.mixes);
        fs.device().on_fence(Some(Box::new(move |point| {
            let k = in_flight.load(Ordering::SeqCst);
            if k == NOT_STARTED || failure.lock().unwrap().is_some() || !rng.chance(sample) {
                return;
            }
            let pending: Vec<u64> = point.pending().iter().map(|l| l.offset).collect();
            let units = crash_units(&pending);
            let mut images: Vec<(Vec<u64>, String)> =
                vec![(vec![], "every pending line lost".into())];
            if !pending.is_empty() {
                images.push((pending.clone(), "every store kept (a process crash)".into()));
                for _ in 0..mixes {
                    let kept: Vec<u64> = units
                        .iter()
                        .filter(|_| rng.chance(50))
                        .flatten()
                        .copied()
                        .collect();
                    let kind = format!("pending lines {kept:?} kept");
                    images.push((kept, kind));
                }
            }
            for (persisted, kind) in images {
                let Ok(mut image) = buffers.recv() else {
                    return;
                };
                point
                    .image_into(&persisted, &mut image)
                    .expect("pending lines only");
                let job = Job {
                    image,
                    op: k,
                    fence: point.fences(),
                    kind,
                };
                if queue.send(job).is_err() {
                    return;
                }
            }
        })));
    }
    for (k, op) in ops.iter().enumerate() {
        in_flight.store(k, Ordering::SeqCst);
        if let Err(e) = apply_fs(&fs, op) {
            fs.device().on_fence(None);
            panic!(
                "seed {seed}: operation {k} ({op:?}) failed: {e}\n\
                 replay: DAXFS_CRASH_SEED={seed} cargo test -p daxfs --test crash_sequences"
            );
        }
        if failure.lock().unwrap().is_some() {
            break;
        }
    }
    in_flight.store(NOT_STARTED, Ordering::SeqCst);
    // Dropping the hook closes the queue; the checkers finish what is in it.
    fs.device().on_fence(None);
    for checker in checkers {
        checker.join().unwrap();
    }
    if let Some(why) = failure.lock().unwrap().take() {
        panic!(
            "seed {seed}: {why}\nreplay: DAXFS_CRASH_SEED={seed} cargo test -p daxfs --test crash_sequences"
        );
    }
    // And the filesystem itself ends where the model does.
    let seen = observe(&fs).unwrap();
    assert!(
        seen == *trees.last().unwrap(),
        "seed {seed}: the end state differs from the model"
    );
    fs.unmount().unwrap();
    let dev = fs.into_device().unwrap();
    let (report, _) = daxfs::fsck(dev, false).unwrap();
    assert!(report.is_clean(), "seed {seed}: {report:?}");
    checked.load(Ordering::Relaxed)
}

#[test]
fn random_sequences_recover_to_a_state_they_passed_through_at_every_sampled_fence() {
    let long = std::env::var_os("DAXFS_CRASH_LONG").is_some();
    let seeds: Vec<u64> = match std::env::var("DAXFS_CRASH_SEED") {
        Ok(s) => vec![s.parse().expect("DAXFS_CRASH_SEED is a number")],
        Err(_) if long => (1..=8).collect(),
        Err(_) => vec![1, 2, 3],
    };
    let plan = if long {
        Plan {
            ops: 2000,
            sample: 100,
            mixes: 2,
        }
    } else {
        Plan {
            ops: 1000,
            sample: 30,
            mixes: 1,
        }
    };
    let started = std::time::Instant::now();
    let mut total = 0;
    let runs = seeds.len() as u64;
    for seed in seeds {
        let n = run_seed(seed, &plan);
        eprintln!("seed {seed}: {n} crash states checked");
        total += n;
    }
    eprintln!(
        "{total} crash states checked in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(total >= 400 * runs, "only {total} crash states");
}
