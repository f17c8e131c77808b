//! Where a filesystem's structures are on the device (`daxfs info`), read
//! without changing a byte, as dumpe2fs does: the superblocks, the state
//! block, the journal (with its checkpoint, the transactions a mount would
//! replay, and why the log ends), the inode table, the bitmap and the data
//! area. Tests and users aim at structures with it.

use daxfs::format::{Superblock, BLOCK, INODE_SIZE};
use daxfs::journal::{self, LogEnd};
use pmem::Device;
use serde_json::{json, Value};

/// The layout of the filesystem on `dev`, as JSON.
pub fn layout_json(dev: &Device) -> Result<Value, String> {
    let (sb, primary) = Superblock::read_either(dev).map_err(|e| e.to_string())?;
    let journal = journal::scan(dev, sb.journal_start, sb.journal_blocks, sb.uuid)
        .map_err(|e| e.to_string())?;
    let area =
        |start: u64, blocks: u64| json!({ "offset": start * BLOCK, "length": blocks * BLOCK });
    let mut value = json!({
        "block_size": BLOCK,
        "uuid": sb.uuid.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "needs_check": sb.needs_check(),
        "superblock": area(0, 1),
        "backup_superblock": area(sb.backup_block, 1),
        "state_block": area(sb.state_block, 1),
        "journal": {
            "offset": journal.region,
            "length": sb.journal_blocks * BLOCK,
            "header": { "offset": journal.region, "length": BLOCK },
            "ring": { "offset": journal.ring, "length": journal.ring_len },
            "checkpoint_sequence": journal.checkpoint.seq,
            "tail": journal.checkpoint.tail,
            "head": journal.head,
            "pending_transactions": journal.pending.len(),
            "pending": journal.pending.iter().map(|t| json!({
                "sequence": t.seq, "ring_offset": t.pos, "length": t.len,
                "writes": t.writes(), "revokes": t.revokes(),
            })).collect::<Vec<_>>(),
            "end": log_end_text(&journal.end),
        },
        "inode_table": {
            "offset": sb.inode_table_start * BLOCK,
            "length": sb.inode_table_blocks * BLOCK,
            "inodes": sb.inode_count,
            "inode_size": INODE_SIZE,
        },
        "bitmap": area(sb.bitmap_start, sb.bitmap_blocks),
        "data": area(sb.data_start, sb.backup_block - sb.data_start),
    });
    if sb.bitmap_csum != 0 {
        value["bitmap_checksums"] = area(sb.bitmap_csum, sb.bitmap_csum_blocks());
        value["bitmap_checksums"]["pieces"] = json!(sb.bitmap_pieces());
    }
    if sb.needs_check() && sb.damaged_tx > 0 {
        value["damaged_journal_transaction"] = json!(sb.damaged_tx);
    }
    if let Some(primary) = primary {
        value["primary_superblock_error"] = json!(primary.to_string());
    }
    Ok(value)
}

/// Why the journal ends where it does, in words.
pub fn log_end_text(end: &LogEnd) -> String {
    match end {
        LogEnd::Clean => "clean".to_string(),
        LogEnd::Torn { seq } => format!("torn: transaction {seq} was being written (harmless)"),
        LogEnd::Damaged {
            seq,
            at,
            why,
            later,
            ..
        } => format!(
            "damaged: transaction {seq} at ring offset {at}: {why}; {later} later transactions are intact"
        ),
    }
}
