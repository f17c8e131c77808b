//! The metadata journal: a redo log of byte-range writes.
//!
//! Every metadata change is a [`Tx`]: a list of (device offset, new bytes)
//! records. Committing one:
//!
//! 1. drains, so that file data written before (into new blocks the
//!    transaction will reference) is durable first;
//! 2. writes the transaction into the ring: a 64-byte header (magic, sequence
//!    number, the filesystem's uuid, length, crc32c of header and records)
//!    followed by the records, then drains: the transaction is committed;
//! 3. applies the records in place (flushed, not yet fenced).
//!
//! Recovery at mount replays, in sequence order from the last checkpoint,
//! every transaction whose header and checksum are intact; records are
//! absolute writes, so replay is idempotent. A torn transaction fails its
//! checksum and is ignored, and its records never reached their places.
//!
//! ## Journal region
//! Block 0 holds two 64-byte checkpoint headers (written alternately so that
//! a torn write leaves the other intact): `magic u32 "DXJH", pad u32,
//! checkpoint sequence u64 (all transactions up to it are durable in place),
//! ring offset u64 of the next transaction, count u64 (which copy is newer),
//! crc32c u32 at byte 60`. The ring is the rest of the region. A transaction
//! that does not fit before the ring's end starts at offset 0. When the ring
//! is full, a checkpoint drains (making every applied record durable) and
//! empties it.
//!
//! ## Transaction
//! `magic u32 "DXTX", nrecords u32, sequence u64, uuid [16], total length
//! u32 (a multiple of 64), crc32c u32, pad to 64`; each record is `offset
//! u64, length u32, pad u32`, then the bytes, padded to 8.

use crate::error::{Error, Result};
use crate::format::BLOCK;
use pmem::Device;

const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"DXJH");
const TX_MAGIC: u32 = u32::from_le_bytes(*b"DXTX");
const TX_HEADER: usize = 64;

/// A metadata transaction being built.
#[derive(Default, Debug)]
pub struct Tx {
    records: Vec<(u64, Vec<u8>)>,
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

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
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

    fn encode(&self, seq: u64, uuid: &[u8; 16]) -> Vec<u8> {
        let mut b = vec![0u8; TX_HEADER];
        for (offset, data) in &self.records {
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.resize(b.len().next_multiple_of(64), 0);
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&TX_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(self.records.len() as u32).to_le_bytes());
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        b[16..32].copy_from_slice(uuid);
        b[32..36].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }
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
    /// Ring bytes in use since the last checkpoint (including skipped ends).
    used: u64,
    /// Checkpoints written (chooses the header copy).
    checkpoints: u64,
    /// Transactions committed since mount, for statistics.
    pub committed: u64,
    /// Records recovery could not replay because their target is poisoned.
    pub skipped: u64,
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
            checkpoints: 0,
            committed: 0,
            skipped: 0,
        }
    }

    fn ring(&self) -> u64 {
        self.region + BLOCK
    }

    /// Open the journal at mount, replaying committed transactions.
    /// Returns the journal and how many transactions were replayed.
    pub fn recover(
        dev: &Device,
        start_block: u64,
        blocks: u64,
        uuid: [u8; 16],
    ) -> Result<(Journal, u64)> {
        let region = start_block * BLOCK;
        let mut header = [0u8; 128];
        read_meta(dev, region, &mut header, "journal header")?;
        let copies: Vec<(u64, u64, u64)> = (0..2)
            .filter_map(|i| decode_header(&header[i * 64..i * 64 + 64]))
            .collect();
        let Some(&(seq, tail, count)) = copies.iter().max_by_key(|c| c.2) else {
            return Err(Error::corrupt(
                "journal header",
                region,
                "both copies are damaged",
            ));
        };
        let mut journal = Journal::empty(region, blocks, uuid);
        // A tail at the very end of the ring means "wrap to the start".
        let tail = if tail == journal.ring_len { 0 } else { tail };
        if tail >= journal.ring_len || !tail.is_multiple_of(64) {
            return Err(Error::corrupt(
                "journal header",
                region,
                format!("ring offset {tail} is out of range"),
            ));
        }
        journal.checkpoints = count + 1;
        journal.head = tail;
        journal.next_seq = seq + 1;
        let mut replayed = 0;
        loop {
            let at_head = journal.read_tx(dev, journal.head)?;
            let found = match at_head {
                Some(tx) => Some((journal.head, tx)),
                None if journal.head != 0 => journal.read_tx(dev, 0)?.map(|tx| (0, tx)),
                None => None,
            };
            let Some((pos, (len, records))) = found else {
                break;
            };
            for (offset, data) in records {
                match dev.memcpy_nodrain(offset, &data) {
                    Ok(()) => {}
                    // Poison arrived over the record's target after it
                    // committed: that structure is lost and stays poisoned
                    // (reads of it give EIO); everything else replays.
                    Err(pmem::Error::PartialPoisonWrite { .. }) => journal.skipped += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            journal.head = (pos + len) % journal.ring_len;
            journal.next_seq += 1;
            replayed += 1;
        }
        dev.drain();
        let last = journal.next_seq - 1;
        journal.checkpoint(dev, last)?;
        Ok((journal, replayed))
    }

    /// Read the transaction at ring offset `pos` if it is the next one in
    /// sequence and intact: its length and records.
    #[allow(clippy::type_complexity)]
    fn read_tx(&self, dev: &Device, pos: u64) -> Result<Option<(u64, Vec<(u64, Vec<u8>)>)>> {
        if pos + TX_HEADER as u64 > self.ring_len {
            return Ok(None);
        }
        let mut head = [0u8; TX_HEADER];
        if dev.read(self.ring() + pos, &mut head).is_err() {
            return Ok(None); // poison in the ring: this transaction never counts
        }
        let magic = u32::from_le_bytes(head[0..4].try_into().expect("4"));
        let seq = u64::from_le_bytes(head[8..16].try_into().expect("8"));
        let len = u32::from_le_bytes(head[32..36].try_into().expect("4")) as u64;
        if magic != TX_MAGIC || seq != self.next_seq || head[16..32] != self.uuid {
            return Ok(None);
        }
        if len < TX_HEADER as u64 || !len.is_multiple_of(64) || pos + len > self.ring_len {
            return Ok(None);
        }
        let mut body = vec![0u8; len as usize];
        if dev.read(self.ring() + pos, &mut body).is_err() {
            return Ok(None);
        }
        let crc = u32::from_le_bytes(body[36..40].try_into().expect("4"));
        body[36..40].fill(0);
        if crc32c::crc32c(&body) != crc {
            return Ok(None);
        }
        let nrec = u32::from_le_bytes(body[4..8].try_into().expect("4")) as usize;
        let mut records = Vec::with_capacity(nrec);
        let mut at = TX_HEADER;
        for _ in 0..nrec {
            if at + 16 > body.len() {
                return Ok(None);
            }
            let offset = u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
            let n = u32::from_le_bytes(body[at + 8..at + 12].try_into().expect("4")) as usize;
            at += 16;
            if at + n > body.len() || offset.checked_add(n as u64).is_none_or(|e| e > dev.size()) {
                return Ok(None);
            }
            records.push((offset, body[at..at + n].to_vec()));
            at = (at + n).next_multiple_of(8);
        }
        Ok(Some((len, records)))
    }

    /// Commit `tx` durably and apply it in place.
    pub fn commit(&mut self, dev: &Device, tx: Tx) -> Result<()> {
        if tx.is_empty() {
            return Ok(());
        }
        // A record that would cover part of a poisoned sector could not be
        // applied: refuse before anything is durable, not after.
        for (offset, data) in &tx.records {
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
        let bytes = tx.encode(self.next_seq, &self.uuid);
        let len = bytes.len() as u64;
        if len > self.ring_len / 2 {
            return Err(Error::Invalid(
                "metadata transaction larger than the journal",
            ));
        }
        let (pos, skipped) = if self.head + len > self.ring_len {
            (0, self.ring_len - self.head)
        } else {
            (self.head, 0)
        };
        if self.used + skipped + len > self.ring_len {
            // Make every applied record durable, then reuse the whole ring.
            dev.drain();
            self.checkpoint(dev, self.next_seq - 1)?;
            return self.commit(dev, tx);
        }
        // File data the transaction will point at must be durable first.
        dev.drain();
        dev.memcpy_nodrain(self.ring() + pos, &bytes)?;
        dev.drain();
        for (offset, data) in &tx.records {
            dev.memcpy_nodrain(*offset, data)?;
        }
        // A transaction that ends exactly at the ring's end wraps the head.
        self.head = (pos + len) % self.ring_len;
        self.used += skipped + len;
        self.next_seq += 1;
        self.committed += 1;
        Ok(())
    }

    /// Record that every transaction up to `seq` is durable in place and the
    /// ring is free from `self.head` on. The caller has drained.
    fn checkpoint(&mut self, dev: &Device, seq: u64) -> Result<()> {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.head.to_le_bytes());
        b[24..32].copy_from_slice(&self.checkpoints.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        let copy = (self.checkpoints % 2) * 64;
        dev.memcpy_persist(self.region + copy, &b)?;
        self.checkpoints += 1;
        self.used = 0;
        Ok(())
    }

    /// A clean checkpoint, at unmount.
    pub fn close(&mut self, dev: &Device) -> Result<()> {
        dev.drain();
        self.checkpoint(dev, self.next_seq - 1)
    }
}

fn decode_header(b: &[u8]) -> Option<(u64, u64, u64)> {
    let mut copy = [0u8; 64];
    copy.copy_from_slice(b);
    let crc = u32::from_le_bytes(copy[60..64].try_into().ok()?);
    copy[60..64].fill(0);
    let ok = u32::from_le_bytes(copy[0..4].try_into().ok()?) == HEADER_MAGIC
        && crc32c::crc32c(&copy) == crc;
    ok.then(|| {
        let at = |i: usize| u64::from_le_bytes(copy[i..i + 8].try_into().expect("8"));
        (at(8), at(16), at(24))
    })
}

/// Read metadata, turning poison into an error that names the structure.
pub fn read_meta(dev: &Device, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
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
