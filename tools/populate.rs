//! `daxfs mkfs --from DIR`: a new filesystem holding a copy of a directory
//! tree, as `mke2fs -d` makes one: files with their data, directories,
//! symlinks, FIFOs, sockets and device nodes, hard links kept as links,
//! modes, owners and times.

use daxfs::{Fs, Ino, SetAttr, ROOT};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What was copied.
#[derive(Debug, Default)]
pub struct Copied {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub links: u64,
    pub bytes: u64,
    /// FIFOs, sockets and device nodes.
    pub special: u64,
}

/// Copy the tree under `from` into the root of `fs`.
pub fn copy_tree(fs: &Fs, from: &Path) -> Result<Copied, String> {
    let meta = std::fs::metadata(from).map_err(|e| format!("{}: {e}", from.display()))?;
    if !meta.is_dir() {
        return Err(format!("{}: not a directory", from.display()));
    }
    let mut copied = Copied::default();
    let mut seen = HashMap::new();
    copy_dir(fs, from, ROOT, &mut seen, &mut copied)?;
    set_attrs(fs, ROOT, &meta).map_err(|e| format!("{}: {e}", from.display()))?;
    Ok(copied)
}

fn copy_dir(
    fs: &Fs,
    dir: &Path,
    into: Ino,
    seen: &mut HashMap<(u64, u64), Ino>,
    copied: &mut Copied,
) -> Result<(), String> {
    let at = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| at(dir, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| at(dir, &e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.as_bytes();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| at(&path, &e))?;
        let kind = meta.file_type();
        let fail = |e: daxfs::Error| at(&path, &e);
        if !kind.is_dir() && !kind.is_symlink() && meta.nlink() > 1 {
            if let Some(&ino) = seen.get(&(meta.dev(), meta.ino())) {
                fs.link(ino, into, name).map_err(fail)?;
                copied.links += 1;
                continue;
            }
        }
        let ino = if kind.is_dir() {
            // (An existing directory, /lost+found, takes what the copy has.)
            let ino = match fs.mkdir(into, name, 0o755, 0, 0) {
                Err(daxfs::Error::Exists) => match fs.lookup(into, name).map_err(fail)? {
                    attr if attr.kind == daxfs::FileKind::Dir => attr.ino,
                    _ => return Err(fail(daxfs::Error::Exists)),
                },
                other => other.map_err(fail)?.ino,
            };
            copy_dir(fs, &path, ino, seen, copied)?;
            copied.dirs += 1;
            ino
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| at(&path, &e))?;
            copied.symlinks += 1;
            fs.symlink(
                into,
                name,
                target.as_os_str().as_bytes(),
                meta.uid(),
                meta.gid(),
            )
            .map_err(fail)?
            .ino
        } else if kind.is_file() {
            let (attr, _) = fs.create(into, name, 0o644, 0, 0, true).map_err(fail)?;
            let mut file = std::fs::File::open(&path).map_err(|e| at(&path, &e))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0;
            loop {
                let n = file.read(&mut buf).map_err(|e| at(&path, &e))?;
                if n == 0 {
                    break;
                }
                fs.write(attr.ino, offset, &buf[..n]).map_err(fail)?;
                offset += n as u64;
            }
            copied.files += 1;
            copied.bytes += offset;
            seen.insert((meta.dev(), meta.ino()), attr.ino);
            attr.ino
        } else {
            // A FIFO, a socket or a device node: its type and device number.
            let attr = fs
                .mknod(into, name, meta.mode(), meta.rdev(), 0, 0)
                .map_err(fail)?;
            copied.special += 1;
            seen.insert((meta.dev(), meta.ino()), attr.ino);
            attr.ino
        };
        if !kind.is_symlink() {
            set_attrs(fs, ino, &meta).map_err(fail)?;
        }
    }
    Ok(())
}

/// Mode, owner and times from `meta`.
fn set_attrs(fs: &Fs, ino: Ino, meta: &std::fs::Metadata) -> daxfs::Result<()> {
    let time = |secs: i64, nanos: i64| daxfs::Timestamp {
        secs,
        nanos: nanos as u32,
    };
    fs.setattr(
        ino,
        &SetAttr {
            mode: Some(meta.mode() & 0o7777),
            uid: Some(meta.uid()),
            gid: Some(meta.gid()),
            size: None,
            atime: Some(time(meta.atime(), meta.atime_nsec())),
            mtime: Some(time(meta.mtime(), meta.mtime_nsec())),
        },
    )
    .map(drop)
}
