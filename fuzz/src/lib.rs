//! What the fuzz targets share: a base image with every kind of structure
//! (built once per process), and the input format that damages it.
//!
//! ## Input
//!
//! A sequence of records, each `kind u8, offset u32 (little-endian), len
//! u8, len bytes`: the bytes are written at `offset` taken modulo the
//! metadata region (everything before the data area, the first 512 KiB of
//! the data area, where this image's directory, extent, xattr and symlink
//! blocks are, and the backup superblock). With `kind` odd, the checksum
//! of the inode the bytes land in is computed anew afterwards, so that
//! field edits get past it. An empty input is the undamaged image.

use daxfs::format::{Superblock, BLOCK, INODE_SIZE};
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::{Fs, Ino, ROOT};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The base image and where it is written for each input.
pub struct Harness {
    pub path: PathBuf,
    pristine: Vec<u8>,
    sb: Superblock,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

impl Harness {
    pub fn get() -> &'static Harness {
        HARNESS.get_or_init(Harness::build)
    }

    fn build() -> Harness {
        let dir = std::env::temp_dir().join(format!("daxfs-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fuzz.img");
        let _ = std::fs::remove_file(&path);
        let fs = Fs::format(Device::create(&path, 16 << 20, &DeviceOptions::new()).unwrap())
            .unwrap();
        let d = fs.mkdir_path("/d", 0o755).unwrap().ino;
        for i in 0..150 {
            let (a, _) = fs
                .create(d, format!("file-{i}").as_bytes(), 0o644, 0, 0, true)
                .unwrap();
            fs.write(a.ino, 0, &[i as u8; 100]).unwrap();
        }
        let frag = fs.create_path("/frag", 0o644, true).unwrap().ino;
        let other = fs.create_path("/other", 0o644, true).unwrap().ino;
        for i in 0..12u64 {
            fs.write(frag, i * BLOCK, &[i as u8; 4096]).unwrap();
            fs.write(other, i * BLOCK, &[0xee; 4096]).unwrap();
        }
        fs.setxattr(frag, b"user.k", b"value", false, false).unwrap();
        fs.symlink_path("/d/long", "y/".repeat(300).as_bytes())
            .unwrap();
        fs.symlink_path("/short", b"d").unwrap();
        fs.link_path("/frag", "/d/hard").unwrap();
        // A live copy: an orphan, and transactions to replay.
        let (o, _) = fs.create(ROOT, b"orphan", 0o644, 0, 0, true).unwrap();
        let held = fs.open(o.ino).unwrap();
        fs.unlink(ROOT, b"orphan").unwrap();
        fs.create_path("/late", 0o644, true).unwrap();
        let pristine = std::fs::read(&path).unwrap();
        fs.close(held).unwrap();
        let sb = fs.superblock().clone();
        fs.unmount().unwrap();
        drop(fs);
        Harness { path, pristine, sb }
    }

    /// Write the base image damaged as `data` says.
    pub fn damage(&self, data: &[u8]) {
        let mut image = self.pristine.clone();
        let meta = (self.sb.data_start * BLOCK + (512 << 10)) as usize;
        let region = meta + BLOCK as usize;
        let backup = image.len() - BLOCK as usize;
        let table = (self.sb.inode_table_start * BLOCK) as usize;
        let table_end = table + (self.sb.inode_count * INODE_SIZE) as usize;
        let mut rest = data;
        while rest.len() >= 6 {
            let kind = rest[0];
            let offset = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize % region;
            let len = (rest[5] as usize).min(rest.len() - 6);
            let bytes = &rest[6..6 + len];
            rest = &rest[6 + len..];
            let at = if offset < meta { offset } else { backup + offset - meta };
            let end = (at + bytes.len()).min(image.len());
            image[at..end].copy_from_slice(&bytes[..end - at]);
            if kind & 1 == 1 && (table..table_end).contains(&at) {
                let start = table + (at - table) / INODE_SIZE as usize * INODE_SIZE as usize;
                let crc = crc32c(&image[start..start + 252]);
                image[start + 252..start + 256].copy_from_slice(&crc.to_le_bytes());
            }
        }
        std::fs::write(&self.path, &image).unwrap();
        let _ = std::fs::remove_file(self.path.with_extension("img.badblocks"));
    }

    pub fn open(&self) -> Device {
        Device::open(&self.path, &DeviceOptions::new()).unwrap()
    }
}

/// CRC-32C (Castagnoli), bitwise: the fuzz crate keeps its dependencies
/// to what the filesystem itself uses.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// Use a mounted filesystem as a program would: walk and read everything,
/// then change it a little.
pub fn exercise(fs: &Fs) {
    fn walk(fs: &Fs, dir: Ino, depth: u32) {
        let Ok(entries) = fs.readdir(dir, 2) else {
            return;
        };
        for e in entries.into_iter().take(300) {
            let Ok(a) = fs.getattr(e.ino) else { continue };
            let _ = fs.listxattr(e.ino);
            match a.kind {
                daxfs::FileKind::Dir if depth < 8 && e.ino != dir => walk(fs, e.ino, depth + 1),
                daxfs::FileKind::Symlink => drop(fs.readlink(e.ino)),
                _ => {
                    let mut buf = vec![0u8; a.size.min(1 << 20) as usize];
                    let _ = fs.read(e.ino, 0, &mut buf);
                }
            }
        }
    }
    walk(fs, ROOT, 0);
    if let Ok((a, _)) = fs.create(ROOT, b"fuzz-new", 0o644, 0, 0, true) {
        let _ = fs.write(a.ino, 0, &[1u8; 20_000]);
    }
    let _ = fs.write_path("/frag", 100, b"written");
    let _ = fs.unlink_path("/d/file-3");
    let _ = fs.rename_path("/d/file-4", "/moved", daxfs::RenameFlags::default());
    let _ = fs.setxattr(ROOT, b"user.x", b"y", false, false);
}
