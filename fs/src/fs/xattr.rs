//! Where an inode's extended attributes live: a chain of xattr blocks
//! (up to [`MAX_BYTES`] of names and values, so that one inode holds
//! 64 KiB and more, and a value may be as long as the VFS allows), or, on
//! an image written before chains, one block of the older format.
//!
//! ```text
//! chain block:  0 magic "DXXC" u32    4 payload bytes in this block u32
//!               8 next block u64 (0: the last)   16 position in the chain u32
//!              20 crc32c u32 of the header (this field zero) and the payload
//!              24 payload
//! ```
//!
//! The payloads, in chain order, are one stream: the entry count u32, then
//! each entry as `name length u8, value length u32, name, value`. Each
//! block is checked where it is read (magic, position, checksum): a block
//! written to the wrong place or out of order fails as a damaged one does.
//! A change writes a new chain into newly taken blocks, outside the journal
//! (as file data is written), and the transaction that commits it points
//! the inode at the new chain and frees the old one: after a crash the
//! inode has one chain or the other, whole (the old blocks are not reused
//! before that commit, and freed blocks are revoked so that no older
//! journal record is replayed over them). The journal carries a few
//! bytes, whatever the size of the attributes.
//!
//! The older single block (`"DXXA"`, see `format.rs`) is still read; the
//! next change writes a chain.

use super::{Fs, Ino, Stage, State};
use crate::error::{Error, Result};
use crate::format::{read_meta, Superblock, BLOCK, XATTR_MAGIC};

/// An inode's extended attributes: (name, value) pairs.
pub(super) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

const CHAIN_MAGIC: u32 = u32::from_le_bytes(*b"DXXC");
const HEADER: usize = 24;
const PAYLOAD: usize = BLOCK as usize - HEADER;
/// The most bytes of names and values (with their lengths) one inode keeps.
pub const MAX_BYTES: usize = 256 << 10;
/// The longest value (the VFS's `XATTR_SIZE_MAX`).
pub const MAX_VALUE: usize = 64 << 10;
/// The longest chain: [`MAX_BYTES`] and the count.
const MAX_BLOCKS: usize = (MAX_BYTES + 4).div_ceil(PAYLOAD);

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn chain_crc(block: &[u8], used: usize) -> u32 {
    let mut header = [0u8; HEADER];
    header.copy_from_slice(&block[..HEADER]);
    header[20..24].fill(0);
    crc32c::crc32c_append(crc32c::crc32c(&header), &block[HEADER..HEADER + used])
}

/// One block of a chain, checked: its payload and the next block.
fn chain_block(raw: &[u8], index: usize) -> std::result::Result<(&[u8], u64), &'static str> {
    if word(raw, 0) != CHAIN_MAGIC {
        return Err("bad magic");
    }
    let used = word(raw, 4) as usize;
    if used > PAYLOAD || word(raw, 16) as usize != index || chain_crc(raw, used) != word(raw, 20) {
        return Err("checksum mismatch");
    }
    let next = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
    Ok((&raw[HEADER..HEADER + used], next))
}

/// The blocks of the chain that starts at `first`, as far as they read and
/// check: what an inode owns even when its attributes are damaged.
pub(super) fn chain_blocks(dev: &pmem::Device, sb: &Superblock, first: u64) -> Vec<u64> {
    let inside = |b: u64| b >= sb.data_start && b < sb.backup_block;
    let mut blocks = Vec::new();
    let mut raw = vec![0u8; BLOCK as usize];
    let mut next = first;
    while next != 0 && inside(next) && blocks.len() < MAX_BLOCKS && !blocks.contains(&next) {
        if dev.read(next * BLOCK, &mut raw).is_err() {
            break;
        }
        if blocks.is_empty() && word(&raw, 0) == XATTR_MAGIC {
            return vec![next]; // the older single block
        }
        let Ok((_, after)) = chain_block(&raw, blocks.len()) else {
            break;
        };
        blocks.push(next);
        next = after;
    }
    // (A first block that does not read is still the inode's.)
    if blocks.is_empty() && inside(first) {
        blocks.push(first);
    }
    blocks
}

/// Read the attributes whose chain (or older block) starts at `first`,
/// and the chain's blocks; an error names the block that fails.
fn read_chain(
    dev: &pmem::Device,
    sb: &Superblock,
    ino: Ino,
    first: u64,
) -> Result<(Xattrs, Vec<u64>)> {
    let what = format!("xattr block of inode {ino}");
    let mut blocks = Vec::new();
    let mut stream = Vec::new();
    let mut raw = vec![0u8; BLOCK as usize];
    let mut next = first;
    while next != 0 {
        if next < sb.data_start || next >= sb.backup_block {
            return Err(Error::corrupt(
                &what,
                sb.inode_offset(ino),
                format!("block {next} lies outside the data area"),
            ));
        }
        if blocks.len() == MAX_BLOCKS || blocks.contains(&next) {
            return Err(Error::corrupt(
                &what,
                next * BLOCK,
                "the chain is too long or loops",
            ));
        }
        read_meta(dev, next * BLOCK, &mut raw, &what)?;
        if blocks.is_empty() && word(&raw, 0) == XATTR_MAGIC {
            return Ok((older_block(&raw, &what, next * BLOCK)?, vec![next]));
        }
        let (payload, after) = chain_block(&raw, blocks.len())
            .map_err(|why| Error::corrupt(&what, next * BLOCK, why))?;
        stream.extend_from_slice(payload);
        blocks.push(next);
        next = after;
    }
    let bad = || Error::corrupt(&what, first * BLOCK, "malformed");
    if stream.len() < 4 {
        return Err(bad());
    }
    let count = word(&stream, 0) as usize;
    let mut out = Vec::new();
    let mut at = 4;
    for _ in 0..count {
        if at + 5 > stream.len() {
            return Err(bad());
        }
        let nl = stream[at] as usize;
        let vl = word(&stream, at + 1) as usize;
        at += 5;
        if vl > MAX_VALUE || at + nl + vl > stream.len() {
            return Err(bad());
        }
        out.push((
            stream[at..at + nl].to_vec(),
            stream[at + nl..at + nl + vl].to_vec(),
        ));
        at += nl + vl;
    }
    Ok((out, blocks))
}

/// The older single-block format: `magic, count, used bytes, crc32c`, then
/// entries `name length u8, value length u16, name, value`.
fn older_block(raw: &[u8], what: &str, offset: u64) -> Result<Xattrs> {
    let bad = |why: &str| Error::corrupt(what, offset, why);
    let (count, used, crc) = (word(raw, 4) as usize, word(raw, 8) as usize, word(raw, 12));
    // (Blocks written before the checksum covered the header have the
    // checksum of the entries alone.)
    let header_crc =
        |used: usize| crc32c::crc32c_append(crc32c::crc32c(&raw[..12]), &raw[16..used]);
    if used < 16
        || used > raw.len()
        || (crc != header_crc(used) && crc != crc32c::crc32c(&raw[16..used]))
    {
        return Err(bad("checksum mismatch"));
    }
    let mut out = Vec::new();
    let mut at = 16;
    for _ in 0..count {
        if at + 3 > used {
            return Err(bad("malformed"));
        }
        let nl = raw[at] as usize;
        let vl = u16::from_le_bytes([raw[at + 1], raw[at + 2]]) as usize;
        at += 3;
        if at + nl + vl > used {
            return Err(bad("malformed"));
        }
        out.push((
            raw[at..at + nl].to_vec(),
            raw[at + nl..at + nl + vl].to_vec(),
        ));
        at += nl + vl;
    }
    Ok(out)
}

impl Fs {
    /// The extended attributes of `ino`.
    pub(super) fn xattrs(&self, st: &mut State, ino: Ino) -> Result<Xattrs> {
        let inode = self.inode(st, ino)?;
        if inode.xattr_block == 0 {
            return Ok(Vec::new());
        }
        Ok(read_chain(&self.core.dev, &self.core.sb, ino, inode.xattr_block)?.0)
    }

    /// The blocks `ino`'s attributes take (as far as they read).
    pub(super) fn xattr_blocks(&self, first: u64) -> Vec<u64> {
        match first {
            0 => Vec::new(),
            _ => chain_blocks(&self.core.dev, &self.core.sb, first),
        }
    }

    /// Write `attrs` as `ino`'s attributes, in this change: a new chain
    /// (see the module docs), the old one freed. `ENOSPC` past
    /// [`MAX_BYTES`], or when the blocks cannot be had.
    pub(super) fn store_xattrs(
        &self,
        st: &mut State,
        stage: &mut Stage,
        ino: Ino,
        attrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let mut inode = self.inode(st, ino)?;
        let mut stream = (attrs.len() as u32).to_le_bytes().to_vec();
        for (name, value) in attrs {
            stream.push(name.len() as u8);
            stream.extend_from_slice(&(value.len() as u32).to_le_bytes());
            stream.extend_from_slice(name);
            stream.extend_from_slice(value);
        }
        if stream.len() > MAX_BYTES + 4 {
            return Err(Error::NoSpace);
        }
        let old = self.xattr_blocks(inode.xattr_block);
        for &block in &old {
            st.alloc.free(block, 1); // (not reused before the commit)
        }
        let need = if attrs.is_empty() {
            0
        } else {
            stream.len().div_ceil(PAYLOAD)
        };
        let mut blocks = Vec::with_capacity(need);
        while blocks.len() < need {
            blocks.push(st.alloc.alloc(1).ok_or(Error::NoSpace)?.0);
        }
        for (i, (&block, payload)) in blocks.iter().zip(stream.chunks(PAYLOAD)).enumerate() {
            // (Header and payload only: the rest of the block is never read.)
            let mut raw = vec![0u8; HEADER + payload.len()];
            raw[0..4].copy_from_slice(&CHAIN_MAGIC.to_le_bytes());
            raw[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            let next = blocks.get(i + 1).copied().unwrap_or(0);
            raw[8..16].copy_from_slice(&next.to_le_bytes());
            raw[16..20].copy_from_slice(&(i as u32).to_le_bytes());
            raw[HEADER..].copy_from_slice(payload);
            let crc = chain_crc(&raw, payload.len());
            raw[20..24].copy_from_slice(&crc.to_le_bytes());
            // Durable before the commit that points at it (its fence).
            self.core.dev.memcpy_nodrain(block * BLOCK, &raw)?;
        }
        inode.xattr_block = blocks.first().copied().unwrap_or(0);
        inode.blocks = (inode.blocks + blocks.len() as u64).saturating_sub(old.len() as u64);
        inode.ctime = crate::format::Time::now();
        self.put_inode(st, stage, ino, inode);
        Ok(())
    }
}
