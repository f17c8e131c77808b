//! The on-media format, described next to the code that reads and writes it.
//! All integers are little-endian. Blocks are 4 KiB.
//!
//! ## Layout
//!
//! ```text
//! block 0            primary superblock
//! block 1            state block: the orphan list's head (changed through the journal)
//! journal_start      journal: a header block, then the ring of transactions
//! inode_table_start  inode table: inode_count inodes of 256 bytes (inode 1 is the root)
//! bitmap_start       allocation bitmap: one bit per block of the device, 1 = in use
//! bitmap_csum        bitmap checksums: a crc32c per 512 bytes of bitmap (0: none, an older image)
//! data_start         data and metadata blocks (2 MiB aligned), allocated from the bitmap
//! last block         backup superblock
//! ```
//!
//! Everything before `data_start` and the last block are marked in use in
//! the bitmap at format time.
//!
//! ## Superblock (first 512 bytes of its block)
//!
//! ```text
//!   0 magic "DAXFSv1\0"      8 version u32          12 block size u32 (4096)
//!  16 total blocks u64      24 inode count u64     32 journal start u64
//!  40 journal blocks u64    48 inode table start   56 inode table blocks
//!  64 bitmap start          72 bitmap blocks       80 data start
//!  88 root inode u64        96 uuid [16]          112 state block u64
//! 120 backup block u64     128 format time (s)    136 flags u64
//! 144 damaged journal transaction u64 (with FLAG_NEEDS_CHECK from the journal)
//! 152 bitmap checksum table block u64 (0: none)
//! 508 crc32c of bytes 0..508
//! ```
//!
//! Flags: [`SB_NEEDS_CHECK`] (bit 0): damage was found (a journal
//! transaction that fails its checks, followed by intact later ones);
//! mount refuses until `fsck --repair` has checked the filesystem and
//! cleared it. Both copies carry it.
//!
//! ## Bitmap checksums
//!
//! The bitmap is checksummed in pieces of 512 bytes (one sector, 4096
//! blocks of the device, so that a commit that changes a few words sums
//! 512 bytes, not 4096): piece `i` has the crc32c of its index (u64)
//! followed by its 512 bytes at byte `4 * i` of the table: a piece written
//! to the wrong place fails as surely as a damaged one. Every transaction
//! that changes bitmap words writes the checksums of their pieces in the
//! same transaction. A piece that fails its checksum is never allocated
//! from: mount rebuilds it from the inodes' extents, or (when an inode
//! cannot be read) keeps its blocks out of allocation until fsck repairs
//! it. An image made before the table
//! existed gets one at its first read-write mount when the space between
//! the bitmap and the data area holds it (it always does for images made
//! since: the table is part of the geometry).
//!
//! ## Checksums: the rule
//!
//! Every structure is validated where it is read, and its checksum is
//! computed where it is written: the superblocks, the state block, the
//! journal (header and each transaction), each 512 bytes of the bitmap, each inode,
//! each directory entry, each overflow extent block, each xattr block and
//! each symlink target stored out of line. A structure that fails is never
//! used: it is reported with the device offset where it lies and the inode
//! or directory it belongs to, and only that inode or directory gives
//! `EIO`.
//!
//! ## Inode (256 bytes; inode `n` is at `inode_table_start * 4096 + (n - 1) * 256`)
//!
//! ```text
//!   0 mode u32 (0: free)    4 nlink u32    8 uid u32    12 gid u32    16 size u64
//!  24 atime s i64  32 atime ns u32  36 mtime ns u32  40 mtime s i64
//!  48 ctime s i64  56 ctime ns u32  60 flags u32 (bit 0: inline symlink
//!     target; 0x10 immutable, 0x20 append-only, 0x40 nodump, 0x80 noatime,
//!     as FS_IOC_GETFLAGS gives them)
//!  64 generation u32        68 extent count u32 (all extents, inline and overflow)
//!  72 first overflow extent block u64    80 first xattr block u64
//!  88 parent inode u64 (directories); for a symlink whose target is in a
//!     block: 1 << 32 | crc32c of the target (0: written before that)
//!                                         96 next orphan u64    104 blocks in use u64
//! 112 8 inline extents of 16 bytes (or, with FLAG_INLINE_LINK, the symlink target;
//!     for a device node, its device number u64 as Linux encodes a dev_t)
//! 240 birth time s i64    248 birth time ns u32 (0 and 0: made before it was kept)
//! 252 crc32c of bytes 0..252
//! ```
//!
//! File types: regular files, directories, symbolic links, and the special
//! files that hold no data: FIFOs, sockets, character and block devices.
//! A special file has size 0, no extents, and (devices only) a device
//! number; FIFOs and sockets keep that field zero.
//!
//! ## Extent (16 bytes)
//! `logical block bits 0..32 u32, then a u32 holding the length in blocks
//! (bits 0..29) and logical bits 48..51 (bits 29..32), then a u64 holding
//! the device block (bits 0..48) and logical bits 32..48 (bits 48..64)`.
//! Logical block numbers thus have 51 bits, enough for the 2^63 - 1 bytes
//! Linux allows a file; lengths have 29 (2 TiB, longer runs take two
//! extents) and device blocks 48 (1 EiB). The high logical bits sit where
//! the first format kept zeros (devices under 2 TiB), so its images read
//! unchanged. An inode's extents are sorted by logical block and never
//! overlap. The first 8 are
//! inline; the rest live in a chain of overflow blocks: `magic u32 "DXEX",
//! count u32, next block u64, crc32c u32 of the whole block with this field
//! zero, 12 bytes reserved`, then up to 254 extents.
//!
//! ## Directory blocks
//! A directory's data blocks hold 128 slots of 32 bytes. An entry takes
//! `ceil((16 + name length) / 32)` consecutive slots of one block: `inode
//! u64, name length u8, file type u8, slot count u8, reserved u8, crc32c u32
//! of the entry with this field zero`, then the name. A free slot starts with
//! eight zero bytes. `.` and `..` are not stored (the parent is in the inode).
//! Entries never move, so a slot's position is a stable `readdir` offset.
//!
//! ## State block
//!
//! ```text
//!  0 orphan list head u64 (an inode number, 0: empty)
//!  8 magic "DXST" u32     12 crc32c u32 of bytes 0..12
//! ```
//!
//! Written through the journal, 16 bytes at a time. A state block written
//! before it had a checksum reads zeros at 8..16: its head is taken (and
//! checked, as every orphan list is, before anything on it is freed) and
//! the next change writes the checksum.
//!
//! ## Extended attributes
//! A chain of blocks (`"DXXC"`, up to 256 KiB of names and values per
//! inode), described in `fs/xattr.rs`. Images written before chains hold
//! one block (`magic u32 "DXXA", count u32, used bytes u32, crc32c u32`,
//! then entries `name length u8, value length u16, name, value`), still
//! read; the next change of the inode's attributes writes a chain.
//!
//! ## Journal
//! See [`crate::journal`].

use crate::error::{Error, Result};

pub const BLOCK: u64 = 4096;
pub const MAGIC: [u8; 8] = *b"DAXFSv1\0";
pub const VERSION: u32 = 1;
pub const SUPERBLOCK_LEN: usize = 512;
pub const INODE_SIZE: u64 = 256;
pub const ROOT_INO: u64 = 1;
pub const INLINE_EXTENTS: usize = 8;
pub const INLINE_LINK_MAX: usize = INLINE_EXTENTS * 16;
pub const OVERFLOW_EXTENTS: usize = 254;
pub const EXTENT_MAGIC: u32 = u32::from_le_bytes(*b"DXEX");
pub const XATTR_MAGIC: u32 = u32::from_le_bytes(*b"DXXA");
pub const SLOT: usize = 32;
pub const SLOTS_PER_BLOCK: usize = BLOCK as usize / SLOT;
pub const DIRENT_HEADER: usize = 16;
pub const NAME_MAX: usize = 255;
/// The largest file: 2^63 - 1 bytes, Linux's MAX_LFS_FILESIZE.
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// One past the last logical block a file may map.
pub const MAX_FILE_BLOCKS: u64 = MAX_FILE_SIZE.div_ceil(BLOCK);
/// The longest extent, in blocks (2 TiB).
pub const MAX_EXTENT_LEN: u64 = (1 << 29) - 1;
/// The largest device, in blocks (1 EiB): what an extent can address.
pub const MAX_DEVICE_BLOCKS: u64 = 1 << 48;
/// The longest symlink target.
pub const SYMLINK_MAX: usize = 4095;
/// What the `parent` field of a symlink inode holds when its `target` is
/// stored in a block: the target's checksum, marked present.
pub fn symlink_check(target: &[u8]) -> u64 {
    1 << 32 | crc32c::crc32c(target) as u64
}

/// Blocks in a 2 MiB region.
pub const HUGE_BLOCKS: u64 = 512;

/// Bytes of the bitmap one checksum covers (a sector).
pub const BITMAP_PIECE: u64 = 512;
/// Device blocks one checksummed piece of the bitmap covers.
pub const BLOCKS_PER_BITMAP_PIECE: u64 = BITMAP_PIECE * 8;
/// Checksums in one block of the table.
pub const BITMAP_CSUMS_PER_BLOCK: u64 = BLOCK / 4;

/// The checksum of bitmap piece `index` holding `piece`.
pub fn bitmap_crc(index: u64, piece: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), piece)
}

/// Superblock flag: the filesystem needs a check before it is mounted.
pub const SB_NEEDS_CHECK: u64 = 1;

/// Inode flag: the symlink target is stored inline.
pub const FLAG_INLINE_LINK: u32 = 1;
/// Inode flag: the file cannot change (`chattr +i`). The attribute flags
/// are stored with the values `FS_IOC_GETFLAGS` gives them.
pub const FLAG_IMMUTABLE: u32 = 0x10;
/// Inode flag: data may only be appended (`chattr +a`).
pub const FLAG_APPEND: u32 = 0x20;
/// Inode flag: not for dump(8) (`chattr +d`).
pub const FLAG_NODUMP: u32 = 0x40;
/// Inode flag: access times are not updated (`chattr +A`).
pub const FLAG_NOATIME: u32 = 0x80;
/// The attribute flags a user sees and sets.
pub const ATTR_FLAGS: u32 = FLAG_IMMUTABLE | FLAG_APPEND | FLAG_NODUMP | FLAG_NOATIME;

/// Read metadata, turning poison into an error that names the structure.
pub fn read_meta(dev: &pmem::Device, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    match dev.read(offset, buf) {
        Ok(()) => Ok(()),
        Err(pmem::Error::Poisoned { offset: at }) => Err(Error::corrupt(
            what,
            offset,
            format!("media error (poison) at {at:#x}"),
        )),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The filesystem's geometry, from the superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub total_blocks: u64,
    pub inode_count: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub inode_table_start: u64,
    pub inode_table_blocks: u64,
    pub bitmap_start: u64,
    pub bitmap_blocks: u64,
    pub data_start: u64,
    pub root_ino: u64,
    pub uuid: [u8; 16],
    pub state_block: u64,
    pub backup_block: u64,
    pub format_time: u64,
    /// [`SB_NEEDS_CHECK`] and future flags.
    pub flags: u64,
    /// With [`SB_NEEDS_CHECK`] set for a damaged journal: the sequence
    /// number of the damaged transaction (0 otherwise).
    pub damaged_tx: u64,
    /// First block of the bitmap checksum table (0: none, an image made
    /// before it existed).
    pub bitmap_csum: u64,
}

impl Superblock {
    /// The geometry for a device of `size` bytes.
    pub fn for_device(size: u64, uuid: [u8; 16], now: u64) -> Result<Superblock> {
        let total_blocks = size / BLOCK;
        let journal_blocks = (total_blocks / 64).clamp(64, 4096);
        let inode_count = (size / (8 << 10)).clamp(1024, 1 << 22);
        let inode_table_blocks = inode_count * INODE_SIZE / BLOCK;
        let bitmap_blocks = total_blocks.div_ceil(BLOCK * 8);
        let journal_start = 2;
        let inode_table_start = journal_start + journal_blocks;
        let bitmap_start = inode_table_start + inode_table_blocks;
        let bitmap_csum = bitmap_start + bitmap_blocks;
        let pieces = bitmap_blocks * (BLOCK / BITMAP_PIECE);
        let data_start =
            (bitmap_csum + pieces.div_ceil(BITMAP_CSUMS_PER_BLOCK)).next_multiple_of(HUGE_BLOCKS);
        if data_start + HUGE_BLOCKS >= total_blocks {
            return Err(Error::Invalid("device too small for a filesystem"));
        }
        if total_blocks > MAX_DEVICE_BLOCKS {
            return Err(Error::Invalid(
                "device too large for a filesystem (at most 1 EiB)",
            ));
        }
        Ok(Superblock {
            total_blocks,
            inode_count,
            journal_start,
            journal_blocks,
            inode_table_start,
            inode_table_blocks,
            bitmap_start,
            bitmap_blocks,
            data_start,
            root_ino: ROOT_INO,
            uuid,
            state_block: 1,
            backup_block: total_blocks - 1,
            format_time: now,
            flags: 0,
            damaged_tx: 0,
            bitmap_csum,
        })
    }

    pub fn encode(&self) -> [u8; SUPERBLOCK_LEN] {
        let mut b = [0u8; SUPERBLOCK_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u32(&mut b, 12, BLOCK as u32);
        for (at, v) in [
            (16, self.total_blocks),
            (24, self.inode_count),
            (32, self.journal_start),
            (40, self.journal_blocks),
            (48, self.inode_table_start),
            (56, self.inode_table_blocks),
            (64, self.bitmap_start),
            (72, self.bitmap_blocks),
            (80, self.data_start),
            (88, self.root_ino),
            (112, self.state_block),
            (120, self.backup_block),
            (128, self.format_time),
            (136, self.flags),
            (144, self.damaged_tx),
            (152, self.bitmap_csum),
        ] {
            put_u64(&mut b, at, v);
        }
        b[96..112].copy_from_slice(&self.uuid);
        let crc = crc32c::crc32c(&b[..508]);
        put_u32(&mut b, 508, crc);
        b
    }

    /// Decode and validate a superblock read at device `offset` of a device
    /// of `device_size` bytes. Every refusal names the structure and offset.
    pub fn decode(b: &[u8], offset: u64, device_size: u64) -> Result<Superblock> {
        let bad = |detail: String| Error::corrupt("superblock", offset, detail);
        if b.len() < SUPERBLOCK_LEN {
            return Err(bad("truncated".into()));
        }
        if b[0..8] != MAGIC {
            if b[0..5] == MAGIC[0..5] {
                return Err(bad(format!(
                    "unknown format {:?}",
                    String::from_utf8_lossy(&b[0..8])
                )));
            }
            return Err(bad("no daxfs magic: not a daxfs filesystem".into()));
        }
        let version = u32_at(b, 8);
        if version > VERSION {
            return Err(bad(format!(
                "format version {version} is newer than this daxfs supports ({VERSION})"
            )));
        }
        let crc = crc32c::crc32c(&b[..508]);
        if crc != u32_at(b, 508) {
            return Err(bad(format!(
                "checksum {:#x} does not match its contents ({crc:#x})",
                u32_at(b, 508)
            )));
        }
        if u32_at(b, 12) as u64 != BLOCK {
            return Err(bad(format!("block size {} is not 4096", u32_at(b, 12))));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[96..112]);
        let sb = Superblock {
            total_blocks: u64_at(b, 16),
            inode_count: u64_at(b, 24),
            journal_start: u64_at(b, 32),
            journal_blocks: u64_at(b, 40),
            inode_table_start: u64_at(b, 48),
            inode_table_blocks: u64_at(b, 56),
            bitmap_start: u64_at(b, 64),
            bitmap_blocks: u64_at(b, 72),
            data_start: u64_at(b, 80),
            root_ino: u64_at(b, 88),
            uuid,
            state_block: u64_at(b, 112),
            backup_block: u64_at(b, 120),
            format_time: u64_at(b, 128),
            flags: u64_at(b, 136),
            damaged_tx: u64_at(b, 144),
            bitmap_csum: u64_at(b, 152),
        };
        let device_blocks = device_size / BLOCK;
        if sb.total_blocks > MAX_DEVICE_BLOCKS {
            return Err(bad(format!(
                "the filesystem spans {} blocks, more than a daxfs can address ({MAX_DEVICE_BLOCKS})",
                sb.total_blocks
            )));
        }
        if sb.total_blocks != device_blocks {
            return Err(bad(format!(
                "the filesystem spans {} blocks but the device holds {device_blocks} (truncated or resized image)",
                sb.total_blocks
            )));
        }
        // The regions must follow each other inside the device.
        let regions = [
            ("state block", sb.state_block, 1),
            ("journal", sb.journal_start, sb.journal_blocks),
            ("inode table", sb.inode_table_start, sb.inode_table_blocks),
            ("bitmap", sb.bitmap_start, sb.bitmap_blocks),
        ];
        let mut end = 1;
        for (name, start, len) in regions {
            if start < end || len == 0 || start.checked_add(len).is_none_or(|e| e > sb.data_start) {
                return Err(bad(format!(
                    "{name} at block {start} (+{len}) is out of place"
                )));
            }
            end = start + len;
        }
        if sb.bitmap_csum != 0
            && (sb.bitmap_csum < end
                || sb
                    .bitmap_csum
                    .checked_add(sb.bitmap_csum_blocks())
                    .is_none_or(|e| e > sb.data_start))
        {
            return Err(bad(format!(
                "bitmap checksums at block {} are out of place",
                sb.bitmap_csum
            )));
        }
        if sb.data_start >= sb.total_blocks
            || sb.backup_block != sb.total_blocks - 1
            || sb
                .inode_count
                .checked_mul(INODE_SIZE)
                .is_none_or(|bytes| bytes > sb.inode_table_blocks.saturating_mul(BLOCK))
            || sb.bitmap_blocks.saturating_mul(BLOCK * 8) < sb.total_blocks
            || sb.root_ino != ROOT_INO
            || sb.journal_blocks < 2
        {
            return Err(bad("inconsistent geometry".into()));
        }
        Ok(sb)
    }

    /// Read and validate the superblock at device `offset`.
    pub fn read(dev: &pmem::Device, offset: u64) -> Result<Superblock> {
        let mut raw = [0u8; SUPERBLOCK_LEN];
        read_meta(dev, offset, &mut raw, "superblock")?;
        Superblock::decode(&raw, offset, dev.size())
    }

    /// The primary superblock, or the backup copy when the primary is bad
    /// (then the primary's error too).
    pub fn read_either(dev: &pmem::Device) -> Result<(Superblock, Option<Error>)> {
        match Superblock::read(dev, 0) {
            Ok(sb) => Ok((sb, None)),
            Err(primary) => {
                let backup_at = (dev.size() / BLOCK - 1) * BLOCK;
                match Superblock::read(dev, backup_at) {
                    Ok(sb) => Ok((sb, Some(primary))),
                    Err(_) => Err(primary),
                }
            }
        }
    }

    /// Whether mount must refuse until fsck has run.
    pub fn needs_check(&self) -> bool {
        self.flags & SB_NEEDS_CHECK != 0
    }

    /// Blocks of the bitmap checksum table.
    pub fn bitmap_csum_blocks(&self) -> u64 {
        self.bitmap_pieces().div_ceil(BITMAP_CSUMS_PER_BLOCK)
    }

    /// Checksummed pieces of the bitmap.
    pub fn bitmap_pieces(&self) -> u64 {
        self.bitmap_blocks * (BLOCK / BITMAP_PIECE)
    }

    /// Where a bitmap checksum table fits: after the bitmap, before the
    /// data area (`None` when the gap is too small).
    pub fn bitmap_csum_room(&self) -> Option<u64> {
        let at = self.bitmap_start + self.bitmap_blocks;
        (at + self.bitmap_csum_blocks() <= self.data_start).then_some(at)
    }

    pub fn inode_offset(&self, ino: u64) -> u64 {
        self.inode_table_start * BLOCK + (ino - 1) * INODE_SIZE
    }
}

/// The state block's contents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBlock {
    /// First inode of the orphan list (0: empty).
    pub orphan_head: u64,
}

/// Bytes of the state block that carry anything.
pub const STATE_LEN: usize = 16;
const STATE_MAGIC: u32 = u32::from_le_bytes(*b"DXST");

impl StateBlock {
    pub fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        put_u64(&mut b, 0, self.orphan_head);
        put_u32(&mut b, 8, STATE_MAGIC);
        let crc = crc32c::crc32c(&b[..12]);
        put_u32(&mut b, 12, crc);
        b
    }

    /// Decode the state block read at device `offset`.
    pub fn decode(b: &[u8; STATE_LEN], offset: u64) -> Result<StateBlock> {
        let state = StateBlock {
            orphan_head: u64_at(b, 0),
        };
        if b[8..16] == [0; 8] {
            return Ok(state); // written before the checksum
        }
        if u32_at(b, 8) != STATE_MAGIC {
            return Err(Error::corrupt("state block", offset, "bad magic"));
        }
        let crc = crc32c::crc32c(&b[..12]);
        if crc != u32_at(b, 12) {
            return Err(Error::corrupt(
                "state block",
                offset,
                format!(
                    "checksum {:#x} does not match its contents ({crc:#x})",
                    u32_at(b, 12)
                ),
            ));
        }
        Ok(state)
    }
}

/// An extent: `len` blocks of a file from logical block `logical`, at device
/// block `physical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub len: u32,
    pub physical: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.logical + self.len as u64
    }

    /// Whether the fields fit their bits on media (what `encode` keeps).
    pub fn fits(&self) -> bool {
        self.end() <= MAX_FILE_BLOCKS
            && self.len as u64 <= MAX_EXTENT_LEN
            && self.physical < MAX_DEVICE_BLOCKS
    }

    fn encode(&self, b: &mut [u8]) {
        debug_assert!(self.fits(), "{self:?}");
        put_u32(b, 0, self.logical as u32);
        put_u32(b, 4, self.len | ((self.logical >> 48) as u32) << 29);
        put_u64(b, 8, self.physical | (self.logical >> 32 & 0xffff) << 48);
    }

    fn decode(b: &[u8]) -> Extent {
        let (low, len, physical) = (u32_at(b, 0), u32_at(b, 4), u64_at(b, 8));
        Extent {
            logical: low as u64 | (physical >> 48) << 32 | ((len >> 29) as u64) << 48,
            len: len & MAX_EXTENT_LEN as u32,
            physical: physical & (MAX_DEVICE_BLOCKS - 1),
        }
    }
}

/// A point in time, as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    /// The time for a file timestamp. Like Linux (`current_time` uses the
    /// coarse clock), this reads `CLOCK_REALTIME_COARSE`: a few nanoseconds
    /// instead of a full clock read, at the resolution of the timer tick.
    pub fn now() -> Time {
        Time::read_clock(libc::CLOCK_REALTIME_COARSE)
    }

    /// The time to the nanosecond, for a stamp that must come after
    /// stamps taken by [`Time::now`] within the same tick: the access time
    /// a read leaves must be later than the change it follows, or relatime
    /// would take every later read for the first one after the change.
    pub fn precise() -> Time {
        Time::read_clock(libc::CLOCK_REALTIME)
    }

    fn read_clock(clock: libc::clockid_t) -> Time {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which we own.
        if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
            return Time {
                secs: ts.tv_sec,
                nanos: ts.tv_nsec as u32,
            };
        }
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

/// An inode as stored (without its overflow extents).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub flags: u32,
    pub generation: u32,
    pub extent_count: u32,
    pub extent_block: u64,
    pub xattr_block: u64,
    pub parent: u64,
    pub next_orphan: u64,
    pub blocks: u64,
    /// The inline area: 8 extents, or an inline symlink target.
    pub inline: [u8; INLINE_LINK_MAX],
    /// When the inode was made (zero: before daxfs kept it).
    pub btime: Time,
}

impl Default for Inode {
    fn default() -> Inode {
        Inode {
            mode: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            size: 0,
            atime: Time::default(),
            mtime: Time::default(),
            ctime: Time::default(),
            flags: 0,
            generation: 0,
            extent_count: 0,
            extent_block: 0,
            xattr_block: 0,
            parent: 0,
            next_orphan: 0,
            blocks: 0,
            inline: [0; INLINE_LINK_MAX],
            btime: Time::default(),
        }
    }
}

impl Inode {
    pub fn is_free(&self) -> bool {
        self.mode == 0
    }

    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }

    /// A FIFO, socket or device node: a file with no data of its own.
    pub fn is_special(&self) -> bool {
        matches!(
            self.kind(),
            libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK
        )
    }

    /// A character or block device node.
    pub fn is_device(&self) -> bool {
        matches!(self.kind(), libc::S_IFCHR | libc::S_IFBLK)
    }

    /// Whether the inline area holds extents (not a symlink target or a
    /// device number).
    pub fn has_extents(&self) -> bool {
        let inline_link = self.kind() == libc::S_IFLNK && self.flags & FLAG_INLINE_LINK != 0;
        !(self.is_special() || inline_link)
    }

    /// The device number of a device node (0 for every other file).
    pub fn rdev(&self) -> u64 {
        if self.is_special() {
            u64::from_le_bytes(self.inline[..8].try_into().unwrap())
        } else {
            0
        }
    }

    /// Set the device number of a special file.
    pub fn set_rdev(&mut self, rdev: u64) {
        self.inline = [0; INLINE_LINK_MAX];
        self.inline[..8].copy_from_slice(&rdev.to_le_bytes());
    }

    pub fn encode(&self) -> [u8; INODE_SIZE as usize] {
        let mut b = [0u8; INODE_SIZE as usize];
        put_u32(&mut b, 0, self.mode);
        put_u32(&mut b, 4, self.nlink);
        put_u32(&mut b, 8, self.uid);
        put_u32(&mut b, 12, self.gid);
        put_u64(&mut b, 16, self.size);
        put_u64(&mut b, 24, self.atime.secs as u64);
        put_u32(&mut b, 32, self.atime.nanos);
        put_u32(&mut b, 36, self.mtime.nanos);
        put_u64(&mut b, 40, self.mtime.secs as u64);
        put_u64(&mut b, 48, self.ctime.secs as u64);
        put_u32(&mut b, 56, self.ctime.nanos);
        put_u32(&mut b, 60, self.flags);
        put_u32(&mut b, 64, self.generation);
        put_u32(&mut b, 68, self.extent_count);
        put_u64(&mut b, 72, self.extent_block);
        put_u64(&mut b, 80, self.xattr_block);
        put_u64(&mut b, 88, self.parent);
        put_u64(&mut b, 96, self.next_orphan);
        put_u64(&mut b, 104, self.blocks);
        b[112..112 + INLINE_LINK_MAX].copy_from_slice(&self.inline);
        put_u64(&mut b, 240, self.btime.secs as u64);
        put_u32(&mut b, 248, self.btime.nanos);
        let crc = crc32c::crc32c(&b[..252]);
        put_u32(&mut b, 252, crc);
        b
    }

    /// Decode inode `ino` read at `offset`; a free inode (all zero) is fine.
    pub fn decode(b: &[u8], ino: u64, offset: u64) -> Result<Inode> {
        if b.iter().all(|&x| x == 0) {
            return Ok(Inode::default());
        }
        let crc = crc32c::crc32c(&b[..252]);
        if crc != u32_at(b, 252) {
            return Err(Error::corrupt(
                format!("inode {ino}"),
                offset,
                "checksum mismatch",
            ));
        }
        let inode = Inode::decode_unchecked(b);
        match inode.unsound() {
            Some(why) => Err(Error::corrupt(format!("inode {ino}"), offset, why)),
            None => Ok(inode),
        }
    }

    /// An empty root directory, made at `now` (by mkfs, and by fsck when
    /// the old one is beyond repair).
    pub fn new_root(now: Time) -> Inode {
        Inode {
            mode: libc::S_IFDIR | 0o755,
            nlink: 2,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            parent: ROOT_INO,
            generation: 1,
            ..Inode::default()
        }
    }

    /// Why the fields of this (allocated) inode cannot be right, if they
    /// cannot: a file type daxfs does not make, a size past the format's
    /// limits.
    pub fn unsound(&self) -> Option<String> {
        let size = self.size;
        if self.flags & !(FLAG_INLINE_LINK | ATTR_FLAGS) != 0 {
            return Some(format!("unknown flags {:#x}", self.flags));
        }
        match self.kind() {
            libc::S_IFREG | libc::S_IFDIR if size > MAX_FILE_SIZE => {
                Some(format!("size {size} is past the largest file"))
            }
            libc::S_IFLNK if size == 0 || size > SYMLINK_MAX as u64 => {
                Some(format!("symlink target length {size} is out of range"))
            }
            libc::S_IFLNK
                if self.flags & FLAG_INLINE_LINK != 0 && size > INLINE_LINK_MAX as u64 =>
            {
                Some(format!("inline symlink target length {size} is too long"))
            }
            libc::S_IFREG | libc::S_IFDIR | libc::S_IFLNK => None,
            libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK => {
                if size != 0 || self.extent_count != 0 || self.extent_block != 0 {
                    Some("a special file with data".to_string())
                } else if self.inline[8..].iter().any(|&b| b != 0)
                    || (!self.is_device() && self.rdev() != 0)
                {
                    Some("special file fields out of range".to_string())
                } else {
                    None
                }
            }
            _ => Some(format!("unknown file type {:#o}", self.mode)),
        }
    }

    /// Decode without checking the checksum or the fields (fsck's look at
    /// a damaged inode).
    pub fn decode_unchecked(b: &[u8]) -> Inode {
        let mut inline = [0u8; INLINE_LINK_MAX];
        inline.copy_from_slice(&b[112..112 + INLINE_LINK_MAX]);
        Inode {
            mode: u32_at(b, 0),
            nlink: u32_at(b, 4),
            uid: u32_at(b, 8),
            gid: u32_at(b, 12),
            size: u64_at(b, 16),
            atime: Time {
                secs: u64_at(b, 24) as i64,
                nanos: u32_at(b, 32),
            },
            mtime: Time {
                secs: u64_at(b, 40) as i64,
                nanos: u32_at(b, 36),
            },
            ctime: Time {
                secs: u64_at(b, 48) as i64,
                nanos: u32_at(b, 56),
            },
            flags: u32_at(b, 60),
            generation: u32_at(b, 64),
            extent_count: u32_at(b, 68),
            extent_block: u64_at(b, 72),
            xattr_block: u64_at(b, 80),
            parent: u64_at(b, 88),
            next_orphan: u64_at(b, 96),
            blocks: u64_at(b, 104),
            inline,
            btime: Time {
                secs: u64_at(b, 240) as i64,
                nanos: u32_at(b, 248),
            },
        }
    }

    pub fn inline_extents(&self) -> Vec<Extent> {
        if !self.has_extents() {
            return Vec::new();
        }
        let n = (self.extent_count as usize).min(INLINE_EXTENTS);
        (0..n)
            .map(|i| Extent::decode(&self.inline[i * 16..i * 16 + 16]))
            .collect()
    }

    pub fn set_inline_extents(&mut self, extents: &[Extent]) {
        self.inline = [0; INLINE_LINK_MAX];
        for (i, e) in extents.iter().take(INLINE_EXTENTS).enumerate() {
            e.encode(&mut self.inline[i * 16..i * 16 + 16]);
        }
    }
}

/// An overflow extent block.
pub struct ExtentBlock {
    pub next: u64,
    pub extents: Vec<Extent>,
}

impl ExtentBlock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        put_u32(&mut b, 0, EXTENT_MAGIC);
        put_u32(&mut b, 4, self.extents.len() as u32);
        put_u64(&mut b, 8, self.next);
        for (i, e) in self.extents.iter().enumerate() {
            e.encode(&mut b[32 + i * 16..48 + i * 16]);
        }
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, 16, crc);
        b
    }

    pub fn decode(b: &[u8], offset: u64) -> Result<ExtentBlock> {
        let bad = |d: &str| Error::corrupt("extent block", offset, d);
        if u32_at(b, 0) != EXTENT_MAGIC {
            return Err(bad("bad magic"));
        }
        let mut copy = b.to_vec();
        put_u32(&mut copy, 16, 0);
        if crc32c::crc32c(&copy) != u32_at(b, 16) {
            return Err(bad("checksum mismatch"));
        }
        let count = u32_at(b, 4) as usize;
        if count > OVERFLOW_EXTENTS {
            return Err(bad("too many extents"));
        }
        Ok(ExtentBlock {
            next: u64_at(b, 8),
            extents: (0..count)
                .map(|i| Extent::decode(&b[32 + i * 16..48 + i * 16]))
                .collect(),
        })
    }
}

/// A directory entry as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    pub kind: u8,
    pub name: Vec<u8>,
}

/// Directory entry file types (as in `d_type`).
pub fn dtype_of(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        _ => libc::DT_REG,
    }
}

/// The file types a directory entry may carry (`DT_*`).
pub const DTYPES: [u8; 7] = [
    libc::DT_FIFO,
    libc::DT_CHR,
    libc::DT_DIR,
    libc::DT_BLK,
    libc::DT_REG,
    libc::DT_LNK,
    libc::DT_SOCK,
];

impl Dirent {
    pub fn slots(name_len: usize) -> usize {
        (DIRENT_HEADER + name_len).div_ceil(SLOT)
    }

    pub fn encode(&self) -> Vec<u8> {
        let slots = Dirent::slots(self.name.len());
        let mut b = vec![0u8; slots * SLOT];
        put_u64(&mut b, 0, self.ino);
        b[8] = self.name.len() as u8;
        b[9] = self.kind;
        b[10] = slots as u8;
        b[16..16 + self.name.len()].copy_from_slice(&self.name);
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, 12, crc);
        b
    }

    /// Decode the entry starting at slot `slot` of `block` (read at
    /// `offset`). `Ok(None)` for a free slot.
    pub fn decode(block: &[u8], slot: usize, offset: u64) -> Result<Option<(Dirent, usize)>> {
        let at = slot * SLOT;
        let ino = u64_at(block, at);
        if ino == 0 {
            return Ok(None);
        }
        let bad = |d: &str| Error::corrupt("directory entry", offset + at as u64, d);
        let name_len = block[at + 8] as usize;
        let slots = block[at + 10] as usize;
        if name_len == 0 || slots != Dirent::slots(name_len) || slot + slots > SLOTS_PER_BLOCK {
            return Err(bad("bad length"));
        }
        let mut copy = block[at..at + slots * SLOT].to_vec();
        put_u32(&mut copy, 12, 0);
        if crc32c::crc32c(&copy) != u32_at(block, at + 12) {
            return Err(bad("checksum mismatch"));
        }
        let name = &block[at + 16..at + 16 + name_len];
        if name.contains(&b'/') || name.contains(&0) {
            return Err(bad("the name holds '/' or NUL"));
        }
        if name == b"." || name == b".." {
            return Err(bad("a stored \".\" or \"..\" entry"));
        }
        if !DTYPES.contains(&block[at + 9]) {
            return Err(bad("unknown file type"));
        }
        Ok(Some((
            Dirent {
                ino,
                kind: block[at + 9],
                name: block[at + 16..at + 16 + name_len].to_vec(),
            },
            slots,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_refuses_damage() {
        let size = 64 << 20;
        let sb = Superblock::for_device(size, [7; 16], 99).unwrap();
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b, 0, size).unwrap(), sb);
        let mut flipped = b;
        flipped[20] ^= 1;
        assert!(Superblock::decode(&flipped, 0, size)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let mut foreign = b;
        foreign[0] = b'X';
        assert!(Superblock::decode(&foreign, 0, size)
            .unwrap_err()
            .to_string()
            .contains("not a daxfs"));
        let mut newer = b;
        put_u32(&mut newer, 8, 2);
        let crc = crc32c::crc32c(&newer[..508]);
        put_u32(&mut newer, 508, crc);
        assert!(Superblock::decode(&newer, 0, size)
            .unwrap_err()
            .to_string()
            .contains("newer"));
        assert!(Superblock::decode(&b, 0, size / 2)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn extents_keep_51_logical_bits_and_read_the_first_format() {
        let e = Extent {
            logical: MAX_FILE_BLOCKS - 3,
            len: 3,
            physical: MAX_DEVICE_BLOCKS - 1,
        };
        assert!(e.fits());
        let mut b = [0u8; 16];
        e.encode(&mut b);
        assert_eq!(Extent::decode(&b), e);
        let e = Extent {
            logical: 0x5_1234_5678_9abc,
            len: MAX_EXTENT_LEN as u32,
            physical: 0x1234_5678,
        };
        e.encode(&mut b);
        assert_eq!(Extent::decode(&b), e);
        // The first format: logical u32, length u32, device block u64.
        let mut old = [0u8; 16];
        put_u32(&mut old, 0, 0xffff_fff0);
        put_u32(&mut old, 4, 12);
        put_u64(&mut old, 8, 900);
        let e = Extent::decode(&old);
        assert_eq!((e.logical, e.len, e.physical), (0xffff_fff0, 12, 900));
        // What cannot be stored is refused, not silently cut.
        assert!(!Extent {
            logical: MAX_FILE_BLOCKS,
            len: 1,
            physical: 9
        }
        .fits());
        assert!(!Extent {
            logical: 0,
            len: 1 << 29,
            physical: 9
        }
        .fits());
        assert!(!Extent {
            logical: 0,
            len: 1,
            physical: MAX_DEVICE_BLOCKS
        }
        .fits());
    }

    #[test]
    fn inodes_and_dirents_round_trip() {
        let mut inode = Inode {
            mode: libc::S_IFREG | 0o644,
            nlink: 1,
            size: 5,
            ..Default::default()
        };
        inode.extent_count = 2;
        let extents = [
            Extent {
                logical: 0,
                len: 1,
                physical: 600,
            },
            Extent {
                logical: 9,
                len: 3,
                physical: 700,
            },
        ];
        inode.set_inline_extents(&extents);
        let b = inode.encode();
        let back = Inode::decode(&b, 2, 0).unwrap();
        assert_eq!(back, inode);
        assert_eq!(back.inline_extents(), extents);
        let d = Dirent {
            ino: 9,
            kind: libc::DT_REG,
            name: b"hello".to_vec(),
        };
        let mut block = vec![0u8; BLOCK as usize];
        let enc = d.encode();
        block[64..64 + enc.len()].copy_from_slice(&enc);
        assert_eq!(Dirent::decode(&block, 2, 0).unwrap(), Some((d, 1)));
        assert_eq!(Dirent::decode(&block, 0, 0).unwrap(), None);
    }
}
