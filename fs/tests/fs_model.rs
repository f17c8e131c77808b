//! The filesystem against an in-memory reference model: random sequences of
//! namespace and data operations, with clean remounts and crash remounts in
//! between; results (value or errno) and the whole tree are compared, and
//! fsck must be clean at the end of every run. A failure names its seed;
//! replay with `FS_MODEL_SEED=<seed> cargo test -p daxfs --test fs_model`.

use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, RenameFlags};
use std::collections::BTreeMap;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Node {
    File(u64),
    Dir,
    Link(Vec<u8>),
    /// A FIFO (`rdev` 0) or a character device; `id` tells its links apart.
    Special {
        id: u64,
        rdev: u64,
    },
}

/// Paths ("/a/b") to nodes; file contents by file id.
#[derive(Default)]
struct Model {
    paths: BTreeMap<String, Node>,
    files: BTreeMap<u64, Vec<u8>>,
    next_id: u64,
}

fn parent_of(path: &str) -> &str {
    &path[..path.rfind('/').unwrap_or(0)]
}

type Outcome = Result<(), i32>;

impl Model {
    fn get(&self, path: &str) -> Option<&Node> {
        if path.is_empty() {
            return Some(&Node::Dir);
        }
        self.paths.get(path)
    }

    /// The errno for a path whose parent must be an existing directory.
    fn check_parent(&self, path: &str) -> Outcome {
        let mut at = String::new();
        for part in parent_of(path).split('/').filter(|p| !p.is_empty()) {
            at = format!("{at}/{part}");
            match self.get(&at) {
                None => return Err(libc::ENOENT),
                Some(Node::Dir) => {}
                // Symlink targets are all "nowhere/...": followed, they dangle.
                Some(Node::Link(_)) => return Err(libc::ENOENT),
                Some(Node::File(_) | Node::Special { .. }) => return Err(libc::ENOTDIR),
            }
        }
        Ok(())
    }

    fn children(&self, dir: &str) -> Vec<String> {
        let prefix = format!("{dir}/");
        self.paths
            .keys()
            .filter(|p| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
            .cloned()
            .collect()
    }

    fn snapshot(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (path, node) in &self.paths {
            let desc = match node {
                Node::File(id) => {
                    let nlink = self
                        .paths
                        .values()
                        .filter(|n| **n == Node::File(*id))
                        .count();
                    format!("file nlink={nlink} {:?}", digest(&self.files[id]))
                }
                Node::Dir => {
                    let subdirs = self
                        .children(path)
                        .iter()
                        .filter(|c| self.paths[*c] == Node::Dir)
                        .count();
                    format!("dir nlink={}", 2 + subdirs)
                }
                Node::Link(t) => format!("link {}", String::from_utf8_lossy(t)),
                Node::Special { rdev, .. } => {
                    let nlink = self.paths.values().filter(|n| *n == node).count();
                    let kind = if *rdev == 0 { "Fifo" } else { "CharDevice" };
                    format!("{kind} nlink={nlink} rdev={rdev:x}")
                }
            };
            out.insert(path.clone(), desc);
        }
        out
    }

    fn create(&mut self, path: &str, exclusive: bool) -> Outcome {
        self.check_parent(path)?;
        match self.get(path) {
            Some(_) if exclusive => Err(libc::EEXIST),
            Some(Node::Dir) => Err(libc::EISDIR),
            Some(_) => Ok(()),
            None => {
                self.next_id += 1;
                self.files.insert(self.next_id, Vec::new());
                self.paths
                    .insert(path.to_string(), Node::File(self.next_id));
                Ok(())
            }
        }
    }

    fn mkdir(&mut self, path: &str) -> Outcome {
        self.check_parent(path)?;
        if self.get(path).is_some() {
            return Err(libc::EEXIST);
        }
        self.paths.insert(path.to_string(), Node::Dir);
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &[u8]) -> Outcome {
        self.check_parent(path)?;
        if self.get(path).is_some() {
            return Err(libc::EEXIST);
        }
        self.paths
            .insert(path.to_string(), Node::Link(target.to_vec()));
        Ok(())
    }

    fn mknod(&mut self, path: &str, rdev: u64) -> Outcome {
        self.check_parent(path)?;
        if self.get(path).is_some() {
            return Err(libc::EEXIST);
        }
        self.next_id += 1;
        let node = Node::Special {
            id: self.next_id,
            rdev,
        };
        self.paths.insert(path.to_string(), node);
        Ok(())
    }

    fn file_of(&self, path: &str) -> Result<u64, i32> {
        self.check_parent(path)?;
        match self.get(path) {
            None => Err(libc::ENOENT),
            Some(Node::Dir) => Err(libc::EISDIR),
            Some(Node::Link(_) | Node::Special { .. }) => Err(libc::EINVAL),
            Some(Node::File(id)) => Ok(*id),
        }
    }

    fn write(&mut self, path: &str, offset: usize, data: &[u8]) -> Outcome {
        let id = self.file_of(path)?;
        let file = self.files.get_mut(&id).unwrap();
        if file.len() < offset + data.len() {
            file.resize(offset + data.len(), 0);
        }
        file[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn truncate(&mut self, path: &str, size: usize) -> Outcome {
        let id = self.file_of(path)?;
        self.files.get_mut(&id).unwrap().resize(size, 0);
        Ok(())
    }

    fn unlink(&mut self, path: &str) -> Outcome {
        self.check_parent(path)?;
        match self.get(path) {
            None => Err(libc::ENOENT),
            Some(Node::Dir) => Err(libc::EISDIR),
            Some(_) => {
                self.paths.remove(path);
                Ok(())
            }
        }
    }

    fn rmdir(&mut self, path: &str) -> Outcome {
        self.check_parent(path)?;
        match self.get(path) {
            None => Err(libc::ENOENT),
            Some(Node::Dir) if !self.children(path).is_empty() => Err(libc::ENOTEMPTY),
            Some(Node::Dir) => {
                self.paths.remove(path);
                Ok(())
            }
            Some(_) => Err(libc::ENOTDIR),
        }
    }

    fn link(&mut self, from: &str, to: &str) -> Outcome {
        self.check_parent(from)?;
        let node = self.get(from).cloned().ok_or(libc::ENOENT)?;
        self.check_parent(to)?;
        if node == Node::Dir {
            return Err(libc::EOPNOTSUPP);
        }
        if self.get(to).is_some() {
            return Err(libc::EEXIST);
        }
        self.paths.insert(to.to_string(), node);
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str, flags: RenameFlags) -> Outcome {
        self.check_parent(from)?;
        self.check_parent(to)?;
        let src = self.get(from).cloned().ok_or(libc::ENOENT)?;
        let dst = self.get(to).cloned();
        if from == to {
            return Ok(()); // the same name: nothing to do (Linux's source == target)
        }
        if src == Node::Dir && to.starts_with(&format!("{from}/")) {
            return Err(libc::EINVAL);
        }
        if let Some(dst) = &dst {
            if dst == &src && (src != Node::Dir || from == to) && !matches!(src, Node::Link(_)) {
                return Ok(()); // two names of one file
            }
            if flags.exchange {
                if *dst == Node::Dir && (from.starts_with(&format!("{to}/"))) {
                    return Err(libc::EINVAL);
                }
                self.swap(from, to);
                return Ok(());
            }
            if flags.noreplace {
                return Err(libc::EEXIST);
            }
            match (&src, dst) {
                (Node::Dir, Node::Dir) if !self.children(to).is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                (Node::Dir, Node::Dir) => {}
                (Node::Dir, _) => return Err(libc::ENOTDIR),
                (_, Node::Dir) => return Err(libc::EISDIR),
                _ => {}
            }
        } else if flags.exchange {
            return Err(libc::ENOENT);
        }
        self.paths.remove(to);
        self.move_tree(from, to);
        Ok(())
    }

    fn move_tree(&mut self, from: &str, to: &str) {
        let prefix = format!("{from}/");
        let moved: Vec<(String, Node)> = self
            .paths
            .iter()
            .filter(|(p, _)| *p == from || p.starts_with(&prefix))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        for (p, _) in &moved {
            self.paths.remove(p);
        }
        for (p, n) in moved {
            self.paths.insert(format!("{to}{}", &p[from.len()..]), n);
        }
    }

    fn swap(&mut self, a: &str, b: &str) {
        let tmp = "/\u{0}swap";
        self.move_tree(a, tmp);
        self.move_tree(b, a);
        self.move_tree(tmp, b);
    }
}

fn digest(data: &[u8]) -> (usize, u32) {
    (
        data.len(),
        data.iter().fold(0x811c_9dc5u32, |h, &b| {
            (h ^ b as u32).wrapping_mul(0x0100_0193)
        }),
    )
}

fn fs_snapshot(fs: &Fs) -> BTreeMap<String, String> {
    fn walk(fs: &Fs, dir: u64, prefix: &str, out: &mut BTreeMap<String, String>) {
        for e in fs.readdir(dir, 2).unwrap() {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&e.name));
            let a = fs.getattr(e.ino).unwrap();
            let desc = match a.kind {
                daxfs::FileKind::File => {
                    let mut data = vec![0u8; a.size as usize];
                    fs.read(e.ino, 0, &mut data).unwrap();
                    format!("file nlink={} {:?}", a.nlink, digest(&data))
                }
                daxfs::FileKind::Dir => format!("dir nlink={}", a.nlink),
                daxfs::FileKind::Symlink => format!(
                    "link {}",
                    String::from_utf8_lossy(&fs.readlink(e.ino).unwrap())
                ),
                kind => format!("{kind:?} nlink={} rdev={:x}", a.nlink, a.rdev),
            };
            out.insert(path.clone(), desc);
            if a.kind == daxfs::FileKind::Dir {
                walk(fs, e.ino, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(fs, daxfs::ROOT, "", &mut out);
    out
}

fn errno<T>(r: daxfs::Result<T>) -> Outcome {
    r.map(drop).map_err(|e| e.errno())
}

fn run(seed: u64, steps: usize, dir: &std::path::Path) -> Result<(), String> {
    let path = dir.join(format!("model-{seed}.img"));
    let mut fs =
        Fs::format(Device::create(&path, 32 << 20, &DeviceOptions::new()).unwrap()).unwrap();
    let mut model = Model::default();
    // What a new filesystem holds.
    model.paths.insert("/lost+found".into(), Node::Dir);
    let mut rng = Rng(seed);
    let dirs = ["", "/a", "/b", "/a/c"];
    let names = ["p", "q", "r", "a", "b", "c"];
    let pick = |rng: &mut Rng| {
        format!(
            "{}/{}",
            dirs[rng.below(4) as usize],
            names[rng.below(6) as usize]
        )
    };
    for step in 0..steps {
        let p = pick(&mut rng);
        let q = pick(&mut rng);
        let op = rng.below(100);
        let (what, got, want) = match op {
            0..=14 => {
                let excl = rng.below(2) == 0;
                (
                    format!("create {p} excl={excl}"),
                    errno(fs.create_path(&p, 0o644, excl)),
                    model.create(&p, excl),
                )
            }
            15..=24 => (
                format!("mkdir {p}"),
                errno(fs.mkdir_path(&p, 0o755)),
                model.mkdir(&p),
            ),
            25..=26 => {
                let target = format!("nowhere{q}");
                (
                    format!("symlink {p}"),
                    errno(fs.symlink_path(&p, target.as_bytes())),
                    model.symlink(&p, target.as_bytes()),
                )
            }
            27..=28 => {
                let (mode, rdev) = match rng.below(2) {
                    0 => (libc::S_IFIFO, 0),
                    _ => (libc::S_IFCHR, libc::makedev(1 + rng.below(300) as u32, 7)),
                };
                (
                    format!("mknod {p} {mode:o} {rdev:x}"),
                    errno(fs.mknod_path(&p, mode | 0o644, rdev)),
                    model.mknod(&p, rdev),
                )
            }
            29..=44 => {
                let scale = [1, 1, 64, 4096][rng.below(4) as usize];
                let offset = rng.below(3 << 20) as usize / scale;
                let max_len = [100, 5000, 70_000][rng.below(3) as usize];
                let len = 1 + rng.below(max_len) as usize;
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u64 ^ seed ^ step as u64) as u8)
                    .collect();
                let got = fs
                    .resolve(&p)
                    .map_err(|e| e.errno())
                    .and_then(|ino| errno(fs.write(ino, offset as u64, &data)));
                (
                    format!("write {p} at {offset} len {len}"),
                    got,
                    model.write(&p, offset, &data),
                )
            }
            45..=51 => {
                let size = rng.below(1 << 20) as usize;
                let got = fs
                    .resolve(&p)
                    .map_err(|e| e.errno())
                    .and_then(|ino| errno(fs.truncate(ino, size as u64)));
                (
                    format!("truncate {p} to {size}"),
                    got,
                    model.truncate(&p, size),
                )
            }
            52..=61 => (
                format!("unlink {p}"),
                errno(fs.unlink_path(&p)),
                model.unlink(&p),
            ),
            62..=69 => (
                format!("rmdir {p}"),
                errno(fs.rmdir_path(&p)),
                model.rmdir(&p),
            ),
            70..=74 => (
                format!("link {p} {q}"),
                errno(fs.link_path(&p, &q)),
                model.link(&p, &q),
            ),
            75..=92 => {
                let flags = match rng.below(4) {
                    0 => RenameFlags {
                        noreplace: true,
                        ..Default::default()
                    },
                    1 => RenameFlags {
                        exchange: true,
                        ..Default::default()
                    },
                    _ => RenameFlags::default(),
                };
                (
                    format!("rename {p} {q} {flags:?}"),
                    errno(fs.rename_path(&p, &q, flags)),
                    model.rename(&p, &q, flags),
                )
            }
            _ => {
                let crash = rng.below(2) == 0;
                fs = if crash {
                    drop(fs);
                    Fs::mount(Device::open(&path, &DeviceOptions::new()).unwrap()).unwrap()
                } else {
                    let dev = fs.into_device().unwrap();
                    Fs::mount(dev).unwrap()
                };
                (format!("remount crash={crash}"), Ok(()), Ok(()))
            }
        };
        if got != want {
            return Err(format!(
                "step {step}: {what}: filesystem {got:?}, model {want:?}"
            ));
        }
        if step % 25 == 0 || op >= 93 {
            let (a, b) = (fs_snapshot(&fs), model.snapshot());
            if a != b {
                return Err(format!(
                    "step {step} after {what}: trees differ:\n fs    {a:?}\n model {b:?}"
                ));
            }
        }
    }
    let (a, b) = (fs_snapshot(&fs), model.snapshot());
    if a != b {
        return Err(format!(
            "at the end: trees differ:\n fs    {a:?}\n model {b:?}"
        ));
    }
    let (report, _) = daxfs::fsck(fs.into_device().unwrap(), false).map_err(|e| e.to_string())?;
    if !report.is_clean() {
        return Err(format!("fsck: {:?}", report.problems));
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[test]
fn the_filesystem_matches_a_model_across_remounts_and_crashes() {
    let dir = tempfile::Builder::new()
        .prefix("daxfs-model")
        .tempdir_in("/dev/shm")
        .unwrap();
    let seeds = match std::env::var("FS_MODEL_SEED") {
        Ok(s) => {
            let s: u64 = s.parse().expect("FS_MODEL_SEED is a number");
            s..s + 1
        }
        Err(_) => 0..150,
    };
    for seed in seeds {
        if let Err(what) = run(seed, 200, dir.path()) {
            panic!("seed {seed}: {what}\nreplay: FS_MODEL_SEED={seed} cargo test -p daxfs --test fs_model");
        }
    }
}
