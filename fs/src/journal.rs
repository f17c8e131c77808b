//! The metadata journal: a redo log of byte-range writes, with revoke
//! records, checkpointed as it goes.
//!
//! ## Committing
//!
//! Every metadata change is a [`Tx`]: writes (device offset, new bytes) and
//! revokes (blocks the change frees). Committing one:
//!
//! 1. drains, so that file data written before (into new blocks the
//!    transaction will reference) is durable, and so is every earlier
//!    transaction's in-place writes;
//! 2. every so often (below), moves the tail: the checkpoint header is
//!    rewritten to say "replay from this transaction on" (flushed, not
//!    fenced);
//! 3. writes the transaction into the ring and drains: the transaction is
//!    committed, and the new tail is durable with it;
//! 4. applies the writes in place (flushed, not fenced: the next commit's
//!    first drain makes them durable).
//!
//! ## Checkpointing as it goes
//!
//! After step 1 of a commit, every earlier transaction is durable in place,
//! so the tail may move to the transaction being committed, and the header
//! that says so becomes durable with the commit's own fence: moving the
//! tail costs a 64-byte flush and no fence. It moves when the last
//! checkpoint is [`CHECKPOINT_EVERY`] transactions or an eighth of the ring
//! behind, so **a crash replays at most the last [`CHECKPOINT_EVERY`]
//! transactions, and at most an eighth of the ring** (plus the one in
//! flight, which is torn and ignored). Not every commit: on a disk-backed
//! image every flush is an `msync`. A transaction that writes into a file's
//! data blocks (the zeroed edges of a punched hole) is checkpointed as soon
//! as it is applied ([`Tx::checkpoint_at_once`]): file data is then
//! written in place without the journal, and a replay must never write the
//! old record over it. Unmount leaves an empty ring.
//!
//! ## Revoke records: replay never writes over a reused block
//!
//! Replay rewrites old records. If a block held metadata that transaction
//! 10 wrote, was freed by transaction 12, and was then reused (as file data,
//! written in place without the journal, or as metadata of another file),
//! replaying transaction 10 after a crash would put the stale record over
//! it. jbd2 prevents that with revoke records (fs/jbd2/revoke.c); XFS log
//! recovery with buffer cancellation (a first pass collects cancelled
//! buffers, the second skips them). Both are the same idea: a scan pass
//! learns which blocks were freed, and by which transaction, and the apply
//! pass skips what they cancel. daxfs takes jbd2's form because its
//! allocator knows every freed extent when a transaction commits: the
//! transaction carries one revoke per freed extent (`first block, count`,
//! 16 bytes however large the extent); recovery's scan collects them, and
//! the apply pass skips every record, or the part of one, that falls in a
//! block revoked by the same or a later transaction. A block freed by a
//! transaction cannot be reused by it (frees take effect once it commits),
//! so the transaction's own writes into blocks it frees are dropped before
//! it is written. XFS's form would need the log to name buffers, which a
//! log of byte ranges does not.
//!
//! ## Recovery
//!
//! [`scan`] reads the log without writing: from the checkpoint's tail it
//! follows the chain of intact transactions, in sequence, and says why the
//! chain ended ([`LogEnd`]): nothing more was written; the next transaction
//! was torn by a crash while it was written (silent: it never committed);
//! or a transaction that fails its checks is followed by intact ones of
//! later sequence numbers. A transaction is written only once the one
//! before is durable, so that is damage, not a crash: recovery replays the
//! chain before it and nothing after, and the filesystem is marked as
//! needing a check (see `Fs::mount`). [`Journal::recover`] then applies the
//! chain, skipping revoked records, and checkpoints.
//!
//! ## Journal region
//!
//! Block 0 holds two 64-byte checkpoint headers (written alternately so
//! that a torn write leaves the other intact):
//!
//! ```text
//!  0 magic "DXJH" u32     4 reserved u32      8 checkpoint sequence u64
//!    (every transaction up to it is durable in place)
//! 16 tail u64 (ring offset of the first transaction to replay)
//! 24 count u64 (which copy is newer)        60 crc32c u32 of bytes 0..60
//! ```
//!
//! The ring is the rest of the region. A transaction that does not fit
//! before the ring's end starts at offset 0.
//!
//! ## Transaction (a multiple of 64 bytes)
//!
//! ```text
//!  0 magic "DXT2" u32      4 write records u32     8 sequence u64
//! 16 filesystem uuid [16] 32 total length u32     36 crc32c u32 (of all of
//!    it, this field zero)  40 ring offset u64 it was written at
//! 48 revoke records u32   52 reserved to 64
//! then each write record: device offset u64, length u32, reserved u32,
//!    the bytes, padded to 8
//! then each revoke record: first block u64, block count u64
//! ```
//!
//! The ring offset in the header keeps a copy of a transaction's bytes
//! elsewhere (inside a record, say) from passing as a transaction there.
//! Transactions of the format before (magic "DXTX": no ring offset, no
//! revokes) that a crash left in the ring are still replayed, as that
//! version did, then the ring is checkpointed past them.

use crate::error::{Error, Result};
use crate::format::{put_u32, put_u64, read_meta, u32_at, u64_at, BLOCK};
use pmem::Device;
use std::collections::BTreeMap;

const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"DXJH");
const TX_MAGIC: u32 = u32::from_le_bytes(*b"DXT2");
/// The transactions of daxfs before revoke records: no ring offset, no
/// revokes. Replayed (as that version did) when a crash left them, so that
/// nothing they committed is lost; never written.
const LEGACY_TX_MAGIC: u32 = u32::from_le_bytes(*b"DXTX");
const TX_HEADER: usize = 64;
const RECORD_HEADER: usize = 16;
const REVOKE_RECORD: usize = 16;

/// The tail moves at least every this many transactions.
pub const CHECKPOINT_EVERY: u64 = 16;

/// Field offsets of a transaction header.
mod tx_field {
    pub const MAGIC: usize = 0;
    pub const RECORDS: usize = 4;
    pub const SEQ: usize = 8;
    pub const UUID: usize = 16;
    pub const LEN: usize = 32;
    pub const CRC: usize = 36;
    pub const POS: usize = 40;
    pub const REVOKES: usize = 48;
}

/// Field offsets of a checkpoint header.
mod header_field {
    pub const MAGIC: usize = 0;
    pub const SEQ: usize = 8;
    pub const TAIL: usize = 16;
    pub const COUNT: usize = 24;
    pub const CRC: usize = 60;
}

/// A metadata transaction being built.
#[derive(Default, Debug)]
pub struct Tx {
    records: Vec<(u64, Vec<u8>)>,
    /// Freed extents: (first block, count).
    revokes: Vec<(u64, u64)>,
    checkpoint_at_once: bool,
}

impl Tx {
    pub fn new() -> Tx {
        Tx::default()
    }

    /// Whether a record writes into device bytes `[start, end)`.
    pub fn touches(&self, start: u64, end: u64) -> bool {
        self.records
            .iter()
            .any(|(at, data)| *at < end && start < at + data.len() as u64)
    }

    /// Record that `bytes` go to device `offset`. Later records win.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) {
        self.records.push((offset, bytes.to_vec()));
    }

    /// Record that `count` blocks from `first` are freed by this
    /// transaction: no write of it or of an earlier transaction to them is
    /// ever replayed.
    pub fn revoke(&mut self, first: u64, count: u64) {
        if count > 0 {
            self.revokes.push((first, count));
        }
    }

    /// Checkpoint as soon as this transaction is applied: it writes into
    /// blocks that are then written in place without the journal (file
    /// data), which a replay of it must never overwrite.
    pub fn checkpoint_at_once(&mut self) {
        self.checkpoint_at_once = true;
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.revokes.is_empty()
    }

    /// The bytes last recorded for `offset` (for tests).
    #[cfg(test)]
    pub(crate) fn value_at(&self, offset: u64) -> Option<&[u8]> {
        self.records
            .iter()
            .rev()
            .find(|(at, _)| *at == offset)
            .map(|(_, bytes)| bytes.as_slice())
    }

    /// The writes that survive this transaction's own revokes (clipped),
    /// and the revokes.
    #[allow(clippy::type_complexity)]
    fn into_live(self) -> (Vec<(u64, Vec<u8>)>, Vec<(u64, u64)>) {
        if self.revokes.is_empty() {
            return (self.records, self.revokes);
        }
        let mut revoked = Revoked::default();
        for &(first, count) in &self.revokes {
            revoked.insert(first, count, 0);
        }
        let mut live = Vec::new();
        for (at, bytes) in &self.records {
            for (start, end) in revoked.live(*at, bytes.len() as u64, 0) {
                live.push((
                    start,
                    bytes[(start - at) as usize..(end - at) as usize].to_vec(),
                ));
            }
        }
        (live, self.revokes)
    }

    /// The transaction's bytes, without its ring offset and checksum
    /// (`seal` adds them once the offset is known).
    fn encode(
        records: &[(u64, Vec<u8>)],
        revokes: &[(u64, u64)],
        seq: u64,
        uuid: &[u8; 16],
    ) -> Vec<u8> {
        let mut b = vec![0u8; TX_HEADER];
        for (offset, data) in records {
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        for (first, count) in revokes {
            b.extend_from_slice(&first.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(64), 0);
        let len = b.len() as u32;
        put_u32(&mut b, tx_field::MAGIC, TX_MAGIC);
        put_u32(&mut b, tx_field::RECORDS, records.len() as u32);
        put_u64(&mut b, tx_field::SEQ, seq);
        b[tx_field::UUID..tx_field::UUID + 16].copy_from_slice(uuid);
        put_u32(&mut b, tx_field::LEN, len);
        put_u32(&mut b, tx_field::REVOKES, revokes.len() as u32);
        b
    }
}

/// Set the ring offset and the checksum of an encoded transaction.
fn seal(b: &mut [u8], pos: u64) {
    put_u64(b, tx_field::POS, pos);
    put_u32(b, tx_field::CRC, 0);
    let crc = crc32c::crc32c(b);
    put_u32(b, tx_field::CRC, crc);
}

/// Revoked byte ranges of the device, each with the newest transaction
/// that revoked it. Ranges never overlap; they are inserted in sequence
/// order, so a new revoke simply replaces what it covers.
#[derive(Default, Debug)]
struct Revoked {
    /// Start byte -> (end byte, sequence number).
    ranges: BTreeMap<u64, (u64, u64)>,
}

impl Revoked {
    /// `count` blocks from `first` revoked by transaction `seq` (no older
    /// than any inserted before).
    fn insert(&mut self, first: u64, count: u64, seq: u64) {
        let start = first.saturating_mul(BLOCK);
        let end = first.saturating_add(count).saturating_mul(BLOCK);
        let overlapping: Vec<(u64, (u64, u64))> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, &v)| (s, v))
            .collect();
        for (s, (e, old)) in overlapping {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, (start, old));
            }
            if e > end {
                self.ranges.insert(end, (e, old));
            }
        }
        self.ranges.insert(start, (end, seq));
    }

    /// The pieces of `[offset, offset + len)` that no transaction numbered
    /// `seq` or later revoked.
    fn live(&self, offset: u64, len: u64, seq: u64) -> Vec<(u64, u64)> {
        let end = offset + len;
        let mut cancelled: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > offset)
            .filter(|(_, &(_, by))| by >= seq)
            .map(|(&s, &(e, _))| (s.max(offset), e.min(end)))
            .collect();
        cancelled.reverse();
        let mut live = Vec::new();
        let mut at = offset;
        for (s, e) in cancelled {
            if s > at {
                live.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            live.push((at, end));
        }
        live
    }
}

/// A checkpoint header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every transaction up to this one is durable in place.
    pub seq: u64,
    /// Ring offset of the first transaction to replay.
    pub tail: u64,
    /// Which copy is newer.
    pub count: u64,
}

impl Checkpoint {
    fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        put_u32(&mut b, header_field::MAGIC, HEADER_MAGIC);
        put_u64(&mut b, header_field::SEQ, self.seq);
        put_u64(&mut b, header_field::TAIL, self.tail);
        put_u64(&mut b, header_field::COUNT, self.count);
        let crc = crc32c::crc32c(&b[..header_field::CRC]);
        put_u32(&mut b, header_field::CRC, crc);
        b
    }

    fn decode(b: &[u8]) -> Option<Checkpoint> {
        let intact = u32_at(b, header_field::MAGIC) == HEADER_MAGIC
            && crc32c::crc32c(&b[..header_field::CRC]) == u32_at(b, header_field::CRC);
        intact.then(|| Checkpoint {
            seq: u64_at(b, header_field::SEQ),
            tail: u64_at(b, header_field::TAIL),
            count: u64_at(b, header_field::COUNT),
        })
    }
}

/// Why the chain of transactions ended where it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEnd {
    /// Nothing more was written (stale or blank bytes follow).
    Clean,
    /// The next transaction was being written when a crash came: its header
    /// is there but it fails its checksum, and nothing later is intact. It
    /// never committed; harmless.
    Torn {
        /// Its sequence number.
        seq: u64,
    },
    /// A transaction that fails its checks, followed by intact transactions
    /// of later sequence numbers: the log is damaged.
    Damaged {
        /// The sequence number the chain needed next.
        seq: u64,
        /// Where it should have been (ring offset).
        at: u64,
        /// What is wrong with what is there.
        why: String,
        /// How many intact later transactions the damage cuts off.
        later: u64,
        /// The newest sequence number among them.
        newest: u64,
    },
}

/// One intact transaction found by [`scan`].
#[derive(Clone, Debug)]
pub struct Scanned {
    pub seq: u64,
    /// Ring offset.
    pub pos: u64,
    /// Bytes in the ring.
    pub len: u64,
    records: Vec<(u64, Vec<u8>)>,
    revokes: Vec<(u64, u64)>,
}

impl Scanned {
    /// How many write records it holds.
    pub fn writes(&self) -> usize {
        self.records.len()
    }

    /// How many revoke records it holds.
    pub fn revokes(&self) -> usize {
        self.revokes.len()
    }
}

/// What a read-only look at the journal found.
#[derive(Clone, Debug)]
pub struct Scan {
    /// Device offset of the header block.
    pub region: u64,
    /// Device offset and length of the ring.
    pub ring: u64,
    pub ring_len: u64,
    /// The newer intact checkpoint header.
    pub checkpoint: Checkpoint,
    /// The transactions a recovery would replay, in order.
    pub pending: Vec<Scanned>,
    /// Ring offset just past the last of them: where the next transaction
    /// goes.
    pub head: u64,
    pub end: LogEnd,
}

/// Why the bytes at a ring offset are not the transaction wanted there.
enum Unfit {
    /// No transaction header of this filesystem.
    NoHeader,
    /// A header, but the transaction fails its checks.
    Bad { seq: u64, why: String },
}

/// The ring of one filesystem's journal, read in place.
struct Ring<'a> {
    dev: &'a Device,
    /// Device offset and length of the ring.
    at: u64,
    len: u64,
    uuid: [u8; 16],
}

impl Ring<'_> {
    /// The transaction at ring offset `pos`, if one of this filesystem was
    /// written there and is intact.
    fn tx_at(&self, pos: u64) -> Result<Scanned, Unfit> {
        if pos + TX_HEADER as u64 > self.len {
            return Err(Unfit::NoHeader);
        }
        let mut h = [0u8; TX_HEADER];
        if self.dev.read(self.at + pos, &mut h).is_err() {
            return Err(Unfit::Bad {
                seq: 0,
                why: "its header is on poisoned media".into(),
            });
        }
        let legacy = u32_at(&h, tx_field::MAGIC) == LEGACY_TX_MAGIC;
        if !(legacy || u32_at(&h, tx_field::MAGIC) == TX_MAGIC)
            || h[tx_field::UUID..tx_field::UUID + 16] != self.uuid[..]
            || (!legacy && u64_at(&h, tx_field::POS) != pos)
        {
            return Err(Unfit::NoHeader);
        }
        let seq = u64_at(&h, tx_field::SEQ);
        let bad = |why: &str| Unfit::Bad {
            seq,
            why: why.to_string(),
        };
        let len = u32_at(&h, tx_field::LEN) as u64;
        if len < TX_HEADER as u64 || !len.is_multiple_of(64) || pos + len > self.len {
            return Err(bad("its length is out of range"));
        }
        let mut body = vec![0u8; len as usize];
        if self.dev.read(self.at + pos, &mut body).is_err() {
            return Err(bad("it is on poisoned media"));
        }
        let crc = u32_at(&body, tx_field::CRC);
        body[tx_field::CRC..tx_field::CRC + 4].fill(0);
        if crc32c::crc32c(&body) != crc {
            return Err(bad("it fails its checksum"));
        }
        let nrec = u32_at(&body, tx_field::RECORDS) as usize;
        let nrev = if legacy {
            0
        } else {
            u32_at(&body, tx_field::REVOKES) as usize
        };
        let mut records = Vec::with_capacity(nrec.min(body.len() / RECORD_HEADER));
        let mut at = TX_HEADER;
        for _ in 0..nrec {
            if at + RECORD_HEADER > body.len() {
                return Err(bad("a record runs past its end"));
            }
            let offset = u64_at(&body, at);
            let n = u32_at(&body, at + 8) as usize;
            at += RECORD_HEADER;
            let past_device = offset
                .checked_add(n as u64)
                .is_none_or(|e| e > self.dev.size());
            if at + n > body.len() || past_device {
                return Err(bad("a record runs past its end or the device's"));
            }
            records.push((offset, body[at..at + n].to_vec()));
            at = (at + n).next_multiple_of(8);
        }
        let mut revokes = Vec::with_capacity(nrev.min(body.len() / REVOKE_RECORD));
        for _ in 0..nrev {
            if at + REVOKE_RECORD > body.len() {
                return Err(bad("a revoke record runs past its end"));
            }
            revokes.push((u64_at(&body, at), u64_at(&body, at + 8)));
            at += REVOKE_RECORD;
        }
        Ok(Scanned {
            seq,
            pos,
            len,
            records,
            revokes,
        })
    }

    /// Every intact transaction in ring offsets `[from, to)`, in ring
    /// order, until `stop` says enough. Read a block at a time; a header
    /// is looked at only where its magic is.
    fn intact_in(&self, from: u64, to: u64, mut stop: impl FnMut(&Scanned) -> bool) {
        let mut block = vec![0u8; BLOCK as usize];
        let mut at = from / 64 * 64;
        while at < to {
            let chunk_end = ((at / BLOCK + 1) * BLOCK).min(to);
            let n = (chunk_end - at) as usize;
            if self.dev.read(self.at + at, &mut block[..n]).is_ok() {
                for off in (0..n).step_by(64) {
                    if u32_at(&block, off) == TX_MAGIC {
                        if let Ok(tx) = self.tx_at(at + off as u64) {
                            if stop(&tx) {
                                return;
                            }
                        }
                    }
                }
            }
            at = chunk_end;
        }
    }
}

/// Read the journal of the filesystem `uuid` (region `start_block`, `blocks`
/// long) without changing a byte: the checkpoint, the transactions a
/// recovery would replay, and why the log ends.
///
/// Where the chain ends, a transaction is damaged (not torn) if an intact
/// one of a later sequence number exists. Such a one can only be the next
/// intact transaction after the chain's end in ring order (the damaged one
/// overwrote everything between), or, had it wrapped, the first intact one
/// from the ring's start: so those two places are looked at, which costs a
/// transaction's read on a used ring. Only once damage is found is the
/// whole ring read, to learn the newest transaction it holds.
pub fn scan(dev: &Device, start_block: u64, blocks: u64, uuid: [u8; 16]) -> Result<Scan> {
    let region = start_block * BLOCK;
    let ring_len = (blocks - 1) * BLOCK;
    let mut header = [0u8; 128];
    read_meta(dev, region, &mut header, "journal header")?;
    let Some(checkpoint) = (0..2)
        .filter_map(|i| Checkpoint::decode(&header[i * 64..i * 64 + 64]))
        .max_by_key(|c| c.count)
    else {
        return Err(Error::corrupt(
            "journal header",
            region,
            "both copies are damaged",
        ));
    };
    // Sequence numbers count up from 1 by one a transaction: one near the
    // top of the range is damage (and would overflow below).
    if checkpoint.seq >= u64::MAX / 2 {
        return Err(Error::corrupt(
            "journal header",
            region,
            format!("sequence number {} is out of range", checkpoint.seq),
        ));
    }
    // A tail at the very end of the ring means "wrap to the start".
    let tail = if checkpoint.tail == ring_len {
        0
    } else {
        checkpoint.tail
    };
    if tail >= ring_len || !tail.is_multiple_of(64) {
        return Err(Error::corrupt(
            "journal header",
            region,
            format!("ring offset {tail} is out of range"),
        ));
    }
    let ring = Ring {
        dev,
        at: region + BLOCK,
        len: ring_len,
        uuid,
    };
    let mut pending = Vec::new();
    let mut head = tail;
    let mut want = checkpoint.seq + 1;
    let first_unfit = loop {
        let found = match ring.tx_at(head) {
            Ok(tx) if tx.seq == want => Ok(tx),
            // A transaction that did not fit before the ring's end went to
            // its start.
            other if head != 0 => match ring.tx_at(0) {
                Ok(tx) if tx.seq == want => Ok(tx),
                _ => Err(other),
            },
            other => Err(other),
        };
        match found {
            Ok(tx) => {
                head = (tx.pos + tx.len) % ring_len;
                want += 1;
                pending.push(tx);
            }
            Err(unfit) => break unfit,
        }
    };
    let mut later_found = false;
    for (from, to) in [(head, ring_len), (0, head)] {
        ring.intact_in(from, to, |tx| {
            later_found |= tx.seq >= want;
            true
        });
    }
    let end = if later_found {
        let (mut later, mut newest) = (0, 0);
        ring.intact_in(0, ring_len, |tx| {
            if tx.seq >= want {
                later += 1;
                newest = newest.max(tx.seq);
            }
            false
        });
        LogEnd::Damaged {
            seq: want,
            at: head,
            why: match first_unfit {
                Ok(tx) => format!("ring offset {head} holds transaction {} instead", tx.seq),
                Err(Unfit::NoHeader) => format!("ring offset {head} holds no transaction"),
                Err(Unfit::Bad { why, .. }) => why,
            },
            later,
            newest,
        }
    } else {
        match first_unfit {
            Err(Unfit::Bad { seq, .. }) if seq == want => LogEnd::Torn { seq },
            _ => LogEnd::Clean,
        }
    };
    Ok(Scan {
        region,
        ring: ring.at,
        ring_len,
        checkpoint,
        pending,
        head,
        end,
    })
}

/// What recovery did.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// Transactions replayed.
    pub replayed: u64,
    /// Records not replayed because their target is poisoned.
    pub poisoned: u64,
    /// Why the log ended.
    pub end: LogEnd,
}

/// The journal of a mounted filesystem.
#[derive(Debug)]
pub struct Journal {
    /// Device offset of the header block.
    region: u64,
    /// Bytes in the ring.
    ring_len: u64,
    uuid: [u8; 16],
    /// Ring offset for the next transaction.
    head: u64,
    /// Sequence number of the next transaction.
    next_seq: u64,
    /// Ring bytes in use from the durable tail to the head (including
    /// skipped ends).
    used: u64,
    /// Transactions committed since the tail last moved.
    since_checkpoint: u64,
    /// Checkpoints written (chooses the header copy).
    checkpoints: u64,
    /// Transactions committed since mount, for statistics.
    pub committed: u64,
}

impl Journal {
    /// Write an empty journal (at format time).
    pub fn format(dev: &Device, start_block: u64, blocks: u64, uuid: [u8; 16]) -> Result<()> {
        let region = start_block * BLOCK;
        dev.memset_persist(region, 0, BLOCK)?;
        let mut journal = Journal::empty(region, blocks, uuid);
        journal.checkpoint(dev, 0)?;
        journal.checkpoint(dev, 0)
    }

    fn empty(region: u64, blocks: u64, uuid: [u8; 16]) -> Journal {
        Journal {
            region,
            ring_len: (blocks - 1) * BLOCK,
            uuid,
            head: 0,
            next_seq: 1,
            used: 0,
            since_checkpoint: 0,
            checkpoints: 0,
            committed: 0,
        }
    }

    fn ring(&self) -> u64 {
        self.region + BLOCK
    }

    /// Open the journal at mount: replay the chain of committed
    /// transactions (skipping revoked records), then checkpoint. A damaged
    /// log is replayed up to the damage (the caller decides what follows:
    /// see [`Journal::discard_damaged`]).
    pub fn recover(
        dev: &Device,
        start_block: u64,
        blocks: u64,
        uuid: [u8; 16],
    ) -> Result<(Journal, Recovery)> {
        let scan = scan(dev, start_block, blocks, uuid)?;
        let mut journal = Journal::empty(scan.region, blocks, uuid);
        journal.checkpoints = scan.checkpoint.count + 1;
        let mut revoked = Revoked::default();
        for tx in &scan.pending {
            for &(first, count) in &tx.revokes {
                revoked.insert(first, count, tx.seq);
            }
        }
        let mut recovery = Recovery {
            replayed: 0,
            poisoned: 0,
            end: scan.end.clone(),
        };
        for tx in &scan.pending {
            for (offset, data) in &tx.records {
                for (start, end) in revoked.live(*offset, data.len() as u64, tx.seq) {
                    let piece = &data[(start - offset) as usize..(end - offset) as usize];
                    match dev.memcpy_nodrain(start, piece) {
                        Ok(()) => {}
                        // Poison arrived over the record's target after it
                        // committed: that structure is lost and stays
                        // poisoned (reads of it give EIO); the rest replays.
                        Err(pmem::Error::PartialPoisonWrite { .. }) => recovery.poisoned += 1,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            recovery.replayed += 1;
        }
        journal.head = scan.head;
        journal.next_seq = scan.checkpoint.seq + 1 + recovery.replayed;
        dev.drain();
        journal.checkpoint(dev, journal.next_seq - 1)?;
        Ok((journal, recovery))
    }

    /// After a damaged log was replayed up to the damage (and the damage
    /// recorded elsewhere): number new transactions after the newest one
    /// the damage cut off, so that none of those is ever taken for part of
    /// the log again.
    pub fn discard_damaged(&mut self, dev: &Device, newest: u64) -> Result<()> {
        self.next_seq = self.next_seq.max(newest.saturating_add(1));
        dev.drain();
        self.checkpoint(dev, self.next_seq - 1)
    }

    /// Sequence number of the next transaction.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Commit `tx` durably and apply it in place.
    pub fn commit(&mut self, dev: &Device, tx: Tx) -> Result<()> {
        if tx.is_empty() {
            return Ok(());
        }
        let checkpoint_at_once = tx.checkpoint_at_once;
        let (records, revokes) = tx.into_live();
        // A record that would cover part of a poisoned sector could not be
        // applied: refuse before anything is durable, not after.
        for (offset, data) in &records {
            let end = offset + data.len() as u64;
            if let Some(bad) = dev.first_poison(*offset, data.len() as u64) {
                let sector_end = bad + pmem::SECTOR;
                if bad < *offset || sector_end > end {
                    return Err(Error::corrupt(
                        "metadata",
                        *offset,
                        format!("media error (poison) at {bad:#x}"),
                    ));
                }
            }
        }
        let mut bytes = Tx::encode(&records, &revokes, self.next_seq, &self.uuid);
        let len = bytes.len() as u64;
        if len > self.ring_len / 2 {
            return Err(Error::Invalid(
                "metadata transaction larger than the journal",
            ));
        }
        let ring_len = self.ring_len;
        let fit = |head: u64| {
            if head + len > ring_len {
                (0, ring_len - head)
            } else {
                (head, 0)
            }
        };
        let (mut pos, mut skipped) = fit(self.head);
        if self.used + skipped + len > self.ring_len {
            // It would overwrite transactions a recovery still replays:
            // make every applied record durable and empty the ring.
            dev.drain();
            self.checkpoint(dev, self.next_seq - 1)?;
            (pos, skipped) = fit(self.head);
        }
        seal(&mut bytes, pos);
        // File data the transaction will point at, and every earlier
        // transaction's in-place writes, durable first.
        dev.drain();
        if self.since_checkpoint >= CHECKPOINT_EVERY || self.used > self.ring_len / 8 {
            // Replay may start at this transaction: the header goes durable
            // with the fence that commits it.
            self.write_checkpoint(dev, self.next_seq - 1, pos)?;
            self.used = 0;
            self.since_checkpoint = 0;
            skipped = 0;
        }
        dev.memcpy_nodrain(self.ring() + pos, &bytes)?;
        dev.drain();
        for (offset, data) in &records {
            dev.memcpy_nodrain(*offset, data)?;
        }
        // A transaction that ends exactly at the ring's end wraps the head.
        self.head = (pos + len) % self.ring_len;
        self.used += skipped + len;
        self.next_seq += 1;
        self.since_checkpoint += 1;
        self.committed += 1;
        if checkpoint_at_once {
            dev.drain();
            self.checkpoint(dev, self.next_seq - 1)?;
        }
        Ok(())
    }

    /// Write the header copy that says every transaction up to `seq` is
    /// durable in place and replay starts at ring offset `tail` (flushed,
    /// not fenced).
    fn write_checkpoint(&mut self, dev: &Device, seq: u64, tail: u64) -> Result<()> {
        let header = Checkpoint {
            seq,
            tail,
            count: self.checkpoints,
        };
        let copy = (self.checkpoints % 2) * 64;
        dev.memcpy_nodrain(self.region + copy, &header.encode())?;
        self.checkpoints += 1;
        Ok(())
    }

    /// Record, durably, that every transaction up to `seq` is durable in
    /// place and the ring is empty from `self.head` on. The caller has
    /// drained.
    fn checkpoint(&mut self, dev: &Device, seq: u64) -> Result<()> {
        self.write_checkpoint(dev, seq, self.head)?;
        dev.drain();
        self.used = 0;
        self.since_checkpoint = 0;
        Ok(())
    }

    /// A clean checkpoint, at unmount: the ring is left empty.
    pub fn close(&mut self, dev: &Device) -> Result<()> {
        dev.drain();
        self.checkpoint(dev, self.next_seq - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoke_cancels_older_and_same_writes_to_its_blocks_only() {
        let mut r = Revoked::default();
        r.insert(10, 2, 5); // bytes 40960..49152 by tx 5
        let b = |n: u64| n * BLOCK;
        // Older and same transaction: cancelled.
        assert_eq!(r.live(b(10), 64, 4), vec![]);
        assert_eq!(r.live(b(11) + 100, 64, 5), vec![]);
        // Later: replays.
        assert_eq!(r.live(b(10), 64, 6), vec![(b(10), b(10) + 64)]);
        // Straddling: only the part outside the revoked blocks survives.
        assert_eq!(
            r.live(b(10) - 32, 64, 1),
            vec![(b(10) - 32, b(10))],
            "the part before"
        );
        assert_eq!(
            r.live(b(9), 4 * BLOCK, 1),
            vec![(b(9), b(10)), (b(12), b(13))]
        );
    }

    #[test]
    fn a_newer_revoke_replaces_what_it_covers_and_keeps_the_rest() {
        let mut r = Revoked::default();
        r.insert(0, 10, 3);
        r.insert(4, 2, 8);
        let b = |n: u64| n * BLOCK;
        // Block 4 revoked by 8: a write of tx 7 there is cancelled...
        assert_eq!(r.live(b(4), 8, 7), vec![]);
        // ...while blocks 0..4 and 6..10 keep revoke 3: tx 7 replays there.
        assert_eq!(r.live(b(3), 8, 7), vec![(b(3), b(3) + 8)]);
        assert_eq!(r.live(b(6), 8, 7), vec![(b(6), b(6) + 8)]);
        assert_eq!(r.live(b(6), 8, 3), vec![]);
        assert_eq!(r.ranges.len(), 3);
    }

    /// A crash under the format before revoke records left a transaction
    /// in the ring: it is replayed, not lost.
    #[test]
    fn a_legacy_transaction_left_by_a_crash_is_replayed() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let dev = Device::create(dir.path().join("j.img"), 16 << 20, &Default::default()).unwrap();
        let uuid = [7u8; 16];
        Journal::format(&dev, 2, 64, uuid).unwrap();
        // The old encoding: DXTX, no ring offset, no revokes.
        let target = 40 * BLOCK + 100;
        let mut tx = vec![0u8; 64];
        tx.extend_from_slice(&target.to_le_bytes());
        tx.extend_from_slice(&5u32.to_le_bytes());
        tx.extend_from_slice(&[0; 4]);
        tx.extend_from_slice(b"hello");
        tx.resize(128, 0);
        tx[0..4].copy_from_slice(b"DXTX");
        tx[4..8].copy_from_slice(&1u32.to_le_bytes());
        tx[8..16].copy_from_slice(&1u64.to_le_bytes());
        tx[16..32].copy_from_slice(&uuid);
        tx[32..36].copy_from_slice(&128u32.to_le_bytes());
        let crc = crc32c::crc32c(&tx);
        tx[36..40].copy_from_slice(&crc.to_le_bytes());
        dev.memcpy_persist(3 * BLOCK, &tx).unwrap();
        let (journal, recovery) = Journal::recover(&dev, 2, 64, uuid).unwrap();
        assert_eq!(recovery.replayed, 1);
        let mut got = [0u8; 5];
        dev.read(target, &mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(journal.next_seq(), 2);
        // Checkpointed past it: nothing to replay the next time.
        assert!(scan(&dev, 2, 64, uuid).unwrap().pending.is_empty());
    }

    #[test]
    fn a_transactions_own_writes_into_blocks_it_frees_are_dropped() {
        let mut tx = Tx::new();
        tx.write(BLOCK * 7, &[1; 32]);
        tx.write(BLOCK * 8 - 16, &[2; 32]); // straddles into block 8
        tx.write(BLOCK * 20, &[3; 8]);
        tx.revoke(7, 1);
        let (live, _) = tx.into_live();
        assert_eq!(
            live,
            vec![(BLOCK * 8, vec![2u8; 16]), (BLOCK * 20, vec![3u8; 8])]
        );
    }
}
