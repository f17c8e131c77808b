//! The running daemon's state, as the control channel's requests see it:
//! the filesystem, the kernel's notifier, the request counters and the
//! poison events; and the requests themselves (`stat`, `list`, poison
//! injection and clearing, scrub), carried out against the live
//! filesystem. The channel (`control`) is protocol only.
//!
//! Commands run against the live filesystem, so poison injected here takes
//! its memory-failure path (`Fs::memory_failure`): the owner of the block
//! is found, the library's own DAX mappings lose the page, free blocks are
//! kept out of allocation; and the daemon's failure handler drops the
//! kernel's cached pages of that range (so a mapped access faults, reads
//! the poison and raises SIGBUS) and records the event for `daxfs stat`.
//! The same happens for poison a read or a scrub finds.

use crate::control::Handler;
use crate::fuse::Counters;
use daxfs::{Fs, MemoryFailure, Owner};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// A poison event, for `stat`.
#[derive(Clone, Debug)]
pub struct PoisonEvent {
    pub offset: u64,
    pub len: u64,
    pub owner: String,
}

/// What the control server needs of the daemon.
pub struct Daemon {
    pub fs: Arc<Fs>,
    pub image: PathBuf,
    pub notifier: Option<fuser::Notifier>,
    pub counters: Arc<Counters>,
    pub events: Arc<Mutex<Vec<PoisonEvent>>>,
    /// The queue of the thread that drops the kernel's cached pages (set
    /// by `watch_failures`).
    pub invalidations: Mutex<Option<std::sync::mpsc::Sender<Invalidation>>>,
    /// Where the control socket is (shown by `stat`).
    pub control_socket: PathBuf,
    /// Whether file data goes through the kernel's page cache (`-o cache`).
    pub cached: bool,
    /// Who listens to the fault trace, and the sessions to tell.
    pub traces: Arc<crate::trace::Traces>,
}

/// Work for the thread that drops the kernel's cached pages.
pub enum Invalidation {
    /// Drop the kernel's cached page of this inode at this byte offset.
    Page { ino: u64, offset: u64 },
    /// Answer once every invalidation queued before this one is done.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

impl Daemon {
    /// Hear of every memory failure of the filesystem: record it, and drop
    /// the kernel's cached pages of a file's poisoned page. The dropping is
    /// done by a thread of its own: a failure found by a read runs in a
    /// FUSE request, and the kernel may hold the very pages an
    /// invalidation waits for until that request is answered.
    pub fn watch_failures(&self) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel::<Invalidation>();
        if let Some(notifier) = self.notifier.clone() {
            std::thread::Builder::new()
                .name("daxfs-failures".into())
                .spawn(move || {
                    for work in rx {
                        match work {
                            Invalidation::Page { ino, offset } => {
                                // ENOENT: the kernel holds nothing of this inode.
                                let _ =
                                    notifier.inval_inode(fuser::INodeNo(ino), offset as i64, 4096);
                            }
                            Invalidation::Barrier(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                })
                .map_err(|e| format!("cannot start the failure thread: {e}"))?;
        }
        let events = Arc::clone(&self.events);
        let queue = tx.clone();
        *self.invalidations.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        self.fs
            .on_memory_failure(Arc::new(move |failure: &MemoryFailure| {
                if let Owner::File { ino, offset } = failure.owner {
                    let offset = offset / 4096 * 4096;
                    let _ = queue.send(Invalidation::Page { ino, offset });
                }
                events
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(PoisonEvent {
                        offset: failure.offset,
                        len: 4096,
                        owner: failure.owner.to_string(),
                    });
            }));
        Ok(())
    }

    /// Wait until the kernel's cached pages of every memory failure handled
    /// so far are dropped, so that a control request that poisoned pages
    /// answers only once no cached copy of them is left: the next access
    /// faults, as Linux's `madvise(MADV_HWPOISON)` has finished with every
    /// mapping when it returns. Called from control threads only (never
    /// from a FUSE request, which the invalidation may wait for).
    fn wait_invalidated(&self) {
        let queue = self
            .invalidations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(queue) = queue {
            let (done, wait) = std::sync::mpsc::sync_channel(1);
            if queue.send(Invalidation::Barrier(done)).is_ok() {
                // A closed channel means the thread is gone (no notifier):
                // nothing is cached by anyone then.
                let _ = wait.recv();
            }
        }
    }
}

impl Handler for Daemon {
    fn session(&self, stream: std::os::unix::net::UnixStream) {
        let refuse = self.cached.then(|| {
            "this mount keeps file data in the kernel's page cache (-o cache), which \
             mappings of the device's pages would bypass"
                .to_string()
        });
        crate::leases::serve(Arc::clone(&self.fs), stream, refuse, &self.traces);
    }

    fn trace(&self, stream: std::os::unix::net::UnixStream) {
        self.traces.listen(&self.fs, stream);
    }

    fn handle(&self, request: &Value) -> Result<String, String> {
        match request["op"].as_str().unwrap_or("") {
            "inject" => {
                let (offset, len) = (number(request, "offset")?, number(request, "len")?);
                inject(self, offset, len)
            }
            "inject_file" => self.inject_file(request),
            "clear" => {
                let (offset, len) = (number(request, "offset")?, number(request, "len")?);
                clear(self, Some((offset, len)))
            }
            "clear_all" => clear(self, None),
            "scrub" => self.scrub(),
            "list" => self.list(request["media_errors"].as_bool().unwrap_or(false)),
            "extents" => self.extents(request),
            "stat" => self.stat(),
            op => Err(format!("bad request: unknown op {op:?}")),
        }
    }
}

fn number(request: &Value, key: &str) -> Result<u64, String> {
    request[key]
        .as_u64()
        .ok_or_else(|| format!("bad request: no {key}"))
}

fn path(request: &Value) -> Result<&str, String> {
    request["path"]
        .as_str()
        .ok_or_else(|| "bad request: no path".to_string())
}

impl Daemon {
    /// Poison bytes of a file, by path and offset in it.
    fn inject_file(&self, request: &Value) -> Result<String, String> {
        let path = path(request)?;
        let (offset, len) = (number(request, "offset")?, number(request, "len")?);
        let at_path = |e: daxfs::Error| format!("{path}: {e}");
        let ino = self.fs.resolve(path).map_err(at_path)?;
        let size = self.fs.getattr(ino).map_err(at_path)?.size;
        if offset >= size {
            return Err(format!(
                "{path}: offset {offset} is past the end ({size} bytes)"
            ));
        }
        let at = self
            .fs
            .device_offset(ino, offset)
            .map_err(at_path)?
            .ok_or_else(|| {
                format!("{path}: offset {offset} is in a hole, which has no block to poison")
            })?;
        inject(self, at / pmem::SECTOR * pmem::SECTOR, len)
    }

    /// Read the whole device; memory failure for the poison found that
    /// nobody had handled yet.
    fn scrub(&self) -> Result<String, String> {
        let mut out = crate::scrub_on(self.fs.device(), &self.image, false)?;
        for f in self.fs.poison_found_in(&self.fs.device().badblocks()) {
            out += &format!("  new: device offset {:#x}: {}\n", f.offset, f.owner);
        }
        self.wait_invalidated();
        Ok(out)
    }

    /// The device, as `daxfs list` shows it.
    fn list(&self, media_errors: bool) -> Result<String, String> {
        let dev = self.fs.device();
        let badblocks = media_errors.then(|| dev.badblocks());
        let value = crate::device_json(&dev.info(), badblocks.as_deref());
        Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&value).expect("JSON")
        ))
    }

    /// A file's extents, as a table or JSON.
    fn extents(&self, request: &Value) -> Result<String, String> {
        let path = path(request)?;
        let at_path = |e: daxfs::Error| format!("{path}: {e}");
        let ino = self.fs.resolve(path).map_err(at_path)?;
        let extents = self.fs.file_extents(ino).map_err(at_path)?;
        if request["json"].as_bool().unwrap_or(false) {
            let list: Vec<Value> = extents
                .iter()
                .map(|e| {
                    json!({
                        "file_offset": e.file_offset,
                        "device_offset": e.device_offset,
                        "length": e.len,
                        "aligned_2mib": e.is_huge_aligned(),
                    })
                })
                .collect();
            return Ok(format!(
                "{}\n",
                serde_json::to_string_pretty(&list).expect("JSON")
            ));
        }
        let mut out = format!(
            "{path}: {} extent{}\n{:>14} {:>14} {:>12}  aligned 2 MiB\n",
            extents.len(),
            if extents.len() == 1 { "" } else { "s" },
            "file offset",
            "device offset",
            "length"
        );
        for e in extents {
            out += &format!(
                "{:>14} {:>14} {:>12}  {}\n",
                e.file_offset,
                format!("{:#x}", e.device_offset),
                e.len,
                if e.is_huge_aligned() { "yes" } else { "no" }
            );
        }
        Ok(out)
    }

    /// The daemon's counters, cache, poison events and DAX faults.
    fn stat(&self) -> Result<String, String> {
        let c = &self.counters;
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let usage = self.fs.cache_usage().map_err(|e| e.to_string())?;
        let mut out = format!(
            "control socket:  {}\nrequests:        {}\nerrors returned: {}\n\
             leaked inodes:   {}\ncached inodes:   {} ({} referenced), {} cached names\n\
             poison events:   {}\n",
            self.control_socket.display(),
            c.requests.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
            c.leaked.load(Ordering::Relaxed),
            usage.inodes,
            usage.referenced,
            usage.dentries,
            events.len()
        );
        for e in events.iter() {
            out += &format!(
                "  device offset {:#x}, {} bytes: {}\n",
                e.offset, e.len, e.owner
            );
        }
        // Library DAX mappings in this process (mmap through the mount
        // itself goes through the kernel's page cache, not these).
        let d = self.fs.dax_stats();
        out += &format!(
            "DAX faults:      {} PMD, {} PTE, {} zero-page maps, {} past EOF\n\
             PMD fallbacks:   {} misaligned, {} past EOF, {} extent not 2 MiB, \
             {} PTE in range, {} private write, {} poisoned\n\
             poisoned pages:  {} mapped inaccessible, {} not cleared\n",
            d.pmd_faults,
            d.pte_faults,
            d.zero_maps,
            d.beyond_eof,
            d.fallback_misaligned,
            d.fallback_past_eof,
            d.fallback_not_huge_extent,
            d.fallback_pte_in_range,
            d.fallback_private_write,
            d.fallback_poisoned,
            d.poisoned_maps,
            self.fs.memory_failures().len()
        );
        Ok(out)
    }
}

/// Poison `[offset, offset + len)` through the filesystem's memory-failure
/// path; says what each page held.
fn inject(daemon: &Daemon, offset: u64, len: u64) -> Result<String, String> {
    let label = daemon.image.display();
    let failures = daemon
        .fs
        .inject_poison(offset, len)
        .map_err(|e| format!("{label}: {e}"))?;
    daemon.wait_invalidated();
    let mut out = format!(
        "{label}: poisoned {} starting at sector {} (device offset {offset:#x})\n",
        crate::sectors_text(len / pmem::SECTOR),
        offset / pmem::SECTOR,
    );
    for f in failures {
        out += &format!("  owner: {}", f.owner);
        if !f.mapped_at.is_empty() {
            out += &format!(" (unmapped from {} DAX mappings)", f.mapped_at.len());
        }
        out += "\n";
    }
    Ok(out)
}

/// Clear poison through the filesystem (quarantined blocks come back,
/// mappings may map the pages again).
fn clear(daemon: &Daemon, range: Option<(u64, u64)>) -> Result<String, String> {
    let label = daemon.image.display();
    let ranges: Vec<(u64, u64)> = match range {
        Some(r) => vec![r],
        None => daemon
            .fs
            .device()
            .badblocks()
            .iter()
            .map(|r| (r.offset(), r.len()))
            .collect(),
    };
    let mut sectors = 0;
    for (offset, len) in ranges {
        daemon
            .fs
            .clear_poison(offset, len)
            .map_err(|e| format!("{label}: {e}"))?;
        sectors += len / pmem::SECTOR;
    }
    Ok(match range {
        Some((offset, _)) => format!(
            "{label}: cleared {} starting at sector {}\n",
            crate::sectors_text(sectors),
            offset / pmem::SECTOR
        ),
        None => format!("{label}: cleared {}\n", crate::sectors_text(sectors)),
    })
}
