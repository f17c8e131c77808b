//! The daemon's end of the layout-lease protocol (see
//! `daxfs_client::lease`): a session per client process that maps device
//! pages itself (the preload library), holding its leases as
//! [`Fs::lease`] pins.
//!
//! Each session has three threads: one reads the client's lines and gives
//! leases back at once (`release`, `recalled`: a break may be waiting for
//! exactly that), one carries out requests in order (which may wait for
//! the filesystem), and one writes answers and recalls (so that a recall,
//! sent from inside a break, never waits for the socket). When the client
//! goes, its leases go with the reader.

use crate::trace::Traces;
use daxfs::dax::{Recall, RecallKind};
use daxfs::{Error, Fs, Pin};
use daxfs_client::lease::{recall_line, Extent, Grant, Hello, Reply, Request, Why};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::ThreadId;

const PAGE: u64 = 4096;

/// Serve a client's session on `stream` (its `dax-session` request was
/// read) until it closes. `refuse` says why this mount cannot hand out
/// its device pages, if it cannot.
pub fn serve(fs: Arc<Fs>, stream: UnixStream, refuse: Option<String>, traces: &Traces) {
    let _ = stream.set_nonblocking(false);
    if let Some(why) = refuse {
        let mut writer = &stream;
        let _ = writeln!(writer, "{}", serde_json::json!({ "error": why }));
        return;
    }
    // Registered before the hello, which says whether faults are traced
    // now; a change after it comes on `out`, after the hello.
    let (out, lines) = channel::<String>();
    let (traced, trace) = traces.add_session(out.clone());
    let dev = fs.device();
    let hello = Hello {
        trace,
        device: dev.path().to_path_buf(),
        size: dev.size(),
        msync: dev.persistence().mode == pmem::PersistenceMode::Msync,
    };
    let write_half = match hello.send(&stream, dev.as_fd().as_raw_fd()) {
        Ok(()) => stream.try_clone(),
        Err(e) => Err(e),
    };
    let Ok(write_half) = write_half else {
        traces.remove_session(traced);
        return;
    };
    let _ = std::thread::Builder::new()
        .name("daxfs-lease-out".into())
        .spawn(move || {
            let mut w = std::io::BufWriter::new(write_half);
            for line in lines {
                if writeln!(w, "{line}").and_then(|_| w.flush()).is_err() {
                    return;
                }
            }
        });
    let session = Arc::new(Session {
        fs,
        out,
        leases: Mutex::new(HashMap::new()),
        worker: OnceLock::new(),
        poisoned: Arc::default(),
    });
    let (work, requests) = channel::<(u64, Request)>();
    let worker = Arc::clone(&session);
    let _ = std::thread::Builder::new()
        .name("daxfs-lease-work".into())
        .spawn(move || {
            let _ = worker.worker.set(std::thread::current().id());
            for (id, request) in requests {
                let reply = worker.carry_out(request);
                let _ = worker.out.send(reply.to_line(id));
            }
        });
    for line in BufReader::new(&stream).lines() {
        let Ok(line) = line else { break };
        match Request::parse(&line) {
            Ok((_, Request::Release { lease } | Request::Recalled { lease })) => {
                session.give_back(lease);
            }
            Ok((_, Request::Trace { line })) => traces.line(line),
            Ok((_, Request::Poisoned { lease, page })) => {
                let (told, heard) = &*session.poisoned;
                told.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((lease, page));
                heard.notify_all();
            }
            Ok((id, request)) => {
                let _ = work.send((id, request));
            }
            Err(e) => {
                let failed = Reply::Failed {
                    errno: libc::EINVAL,
                    message: e,
                };
                let _ = session.out.send(failed.to_line(0));
            }
        }
    }
    // The client is gone: so are its leases.
    traces.remove_session(traced);
    session
        .leases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

/// File pages `[first, end)` (a client's, parsed with `first < end`) as
/// a byte offset and length, or why not.
fn bytes(first: u64, end: u64) -> daxfs::Result<(u64, u64)> {
    match (first.checked_mul(PAGE), end.checked_mul(PAGE)) {
        (Some(at), Some(to)) => Ok((at, to - at)),
        _ => Err(Error::Invalid("page range past the largest file")),
    }
}

struct Session {
    fs: Arc<Fs>,
    /// Lines for the writer thread.
    out: Sender<String>,
    leases: Mutex<HashMap<u64, Pin>>,
    /// The thread that carries out this session's requests.
    worker: OnceLock<ThreadId>,
    /// Poisoned pages the client has made inaccessible, as (lease, page),
    /// until the memory failure waiting for them takes them.
    poisoned: Arc<PoisonAnswers>,
}

/// The (lease, page) pairs a client said it made inaccessible, and the
/// condition memory failure waits on for them.
type PoisonAnswers = (Mutex<HashSet<(u64, u64)>>, Condvar);

impl Session {
    fn carry_out(&self, request: Request) -> Reply {
        let done = match request {
            Request::Lease { ino, first, end } => self.lease(ino, first, end).map(Reply::Granted),
            Request::Allocate { ino, first, end } => bytes(first, end)
                .and_then(|(at, len)| self.fs.allocate_leased(ino, at, len))
                .map(|()| Reply::Done),
            Request::Size { ino } => self.fs.getattr(ino).map(|a| Reply::Size(a.size)),
            Request::Extents { ino } => self.fs.file_extents(ino).map(|list| {
                Reply::Extents(
                    list.iter()
                        .map(|e| Extent {
                            page: e.file_offset / PAGE,
                            pfn: e.device_offset / PAGE,
                            pages: e.len / PAGE,
                        })
                        .collect(),
                )
            }),
            Request::Release { .. }
            | Request::Recalled { .. }
            | Request::Poisoned { .. }
            | Request::Trace { .. } => Ok(Reply::Done),
        };
        done.unwrap_or_else(|e| Reply::Failed {
            errno: e.errno(),
            message: e.to_string(),
        })
    }

    fn lease(&self, ino: u64, first: u64, end: u64) -> daxfs::Result<Grant> {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let lease = IDS.fetch_add(1, Ordering::Relaxed);
        let out = Mutex::new(self.out.clone());
        let worker = self.worker.get().copied();
        let poisoned = Arc::clone(&self.poisoned);
        let timeout = self.fs.layout_timeout();
        let recall: Recall = Arc::new(move |why: RecallKind| {
            // Blocks given to holes at this client's own request (the break
            // runs in its worker): its fault maps them itself, and unmaps
            // them from its other mappings.
            if why == RecallKind::FillingHoles && Some(std::thread::current().id()) == worker {
                return false;
            }
            let _ = out
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(recall_line(
                    lease,
                    match why {
                        RecallKind::Freeing => Why::Freeing,
                        RecallKind::FillingHoles => Why::Holes,
                        RecallKind::Poisoned { page } => Why::Poisoned(page),
                    },
                ));
            // Memory failure is over when the client's page is gone.
            if let RecallKind::Poisoned { page } = why {
                let (told, heard) = &*poisoned;
                let deadline = std::time::Instant::now() + timeout;
                let mut told = told.lock().unwrap_or_else(|e| e.into_inner());
                while !told.remove(&(lease, page)) {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    told = heard
                        .wait_timeout(told, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                return false; // (the lease stays)
            }
            true
        });
        let (at, len) = bytes(first, end)?;
        let pin = self.fs.lease(ino, at, len, recall)?;
        let size = self.fs.getattr(ino)?.size;
        let dev = self.fs.device();
        let extents: Vec<Extent> = pin
            .extents()
            .iter()
            .map(|e| Extent {
                page: e.file_offset / PAGE,
                pfn: e.device_offset / PAGE,
                pages: e.len / PAGE,
            })
            .collect();
        // The device's bad ranges (few) against the extents, not a look
        // per page of a lease that may cover gigabytes.
        let bad = dev.badblocks();
        let poisoned = extents
            .iter()
            .flat_map(|e| {
                bad.iter().filter_map(move |r| {
                    let from = (r.offset() / PAGE).max(e.pfn);
                    let to = (r.offset() + r.len()).div_ceil(PAGE).min(e.pfn + e.pages);
                    (from < to).then_some((from, to - from))
                })
            })
            .collect();
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lease, pin);
        Ok(Grant {
            lease,
            size,
            extents,
            poisoned,
        })
    }

    fn give_back(&self, lease: u64) {
        let pin = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lease);
        drop(pin);
    }
}
