//! A session with one mount's daemon (see `daxfs_client::lease`): the
//! device it hands over, requests and their answers, and the recalls it
//! sends, carried out by a thread of ours.
//!
//! Three parties share the socket: any thread may ask (a fault, an
//! `mmap`), a reader thread hands each answer to the thread that asked and
//! each recall to the recall thread, and the recall thread unmaps the
//! recalled range (waiting for faults of the file in flight, which never
//! wait for it: a request that meets a recall fails with `EAGAIN`, and the
//! fault lets go of its locks and asks again) and gives the lease back.
//!
//! After `fork` the child has none of those threads and shares the
//! parent's socket: it connects anew ([`Session::reconnect`]), so that the
//! daemon holds leases of its own for what it maps.

use crate::device::RemoteDevice;
use daxfs::dax::{DaxCounters, FaultEvent, FileDax};
use daxfs::{Error, Result};
use daxfs_client::lease::{Event, Grant, Hello, Reply, Request, Why, SESSION};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// What a leased range of a file is, as the recall thread and the
/// mapping's layout both see it.
pub struct Lease {
    pub ino: u64,
    /// File pages `[first, end)`.
    pub first: u64,
    pub end: u64,
    pub file: Arc<FileDax>,
    /// The grant, while the daemon holds the lease for us.
    pub grant: Mutex<Option<Grant>>,
}

/// The connection of one process.
struct Conn {
    stream: UnixStream,
    /// The reader thread's copy of the socket (closed by a child after
    /// `fork`, where no thread reads it).
    reader: RawFd,
    pid: u32,
}

type Waiters = Arc<Mutex<HashMap<u64, SyncSender<Reply>>>>;

pub struct Session {
    mountpoint: PathBuf,
    conn: Mutex<Conn>,
    next_id: AtomicU64,
    pending: Mutex<Waiters>,
    pub device: RemoteDevice,
    pub counters: DaxCounters,
    /// Leases granted, by id, for the recall thread.
    leases: Mutex<HashMap<u64, Weak<Lease>>>,
    /// The DAX state of each file mapped through this session.
    files: Mutex<HashMap<u64, Weak<FileDax>>>,
}

/// Connect, ask for a session, and take the hello and the device.
fn handshake(mountpoint: &Path) -> std::result::Result<(UnixStream, Hello, OwnedFd), String> {
    let stream = daxfs_client::socket::connect(mountpoint)?;
    let mut w = &stream;
    writeln!(w, "{{\"op\":\"{SESSION}\"}}").map_err(|e| e.to_string())?;
    let (hello, fd) = Hello::receive(&stream)?;
    Ok((stream, hello, fd))
}

impl Session {
    /// Open a session with the daemon of the mount at `mountpoint`.
    pub fn open(mountpoint: &Path) -> std::result::Result<Arc<Session>, String> {
        let (stream, hello, fd) = handshake(mountpoint)?;
        let device = RemoteDevice::open(fd, &hello)?;
        let session = Arc::new(Session {
            mountpoint: mountpoint.to_path_buf(),
            conn: Mutex::new(Conn {
                reader: -1,
                stream: stream.try_clone().map_err(|e| e.to_string())?,
                pid: std::process::id(),
            }),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Arc::default()),
            device,
            counters: DaxCounters::default(),
            leases: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
        });
        // Before any fault of ours: traced from the first, if asked.
        session.trace(hello.trace);
        session.start(stream)?;
        Ok(session)
    }

    /// Start the reader and recall threads on `stream`.
    fn start(self: &Arc<Self>, stream: UnixStream) -> std::result::Result<(), String> {
        let pending: Waiters = Arc::default();
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&pending);
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).reader = stream.as_raw_fd();
        let (recalls, recalled) = channel::<(u64, Why)>();
        let traced = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("daxfs-preload-in".into())
            .spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    match Event::parse(&line) {
                        Ok(Event::Reply { id, reply }) => {
                            let waiter = pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(reply);
                            }
                        }
                        Ok(Event::Recall { lease, why }) => {
                            let _ = recalls.send((lease, why));
                        }
                        Ok(Event::Trace(on)) => {
                            if let Some(session) = traced.upgrade() {
                                session.trace(on);
                            }
                        }
                        Err(_) => {}
                    }
                }
                // The daemon is gone: nobody will answer.
                pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
            })
            .map_err(|e| e.to_string())?;
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("daxfs-preload-recall".into())
            .spawn(move || {
                for (lease, why) in recalled {
                    let Some(session) = weak.upgrade() else {
                        return;
                    };
                    match why {
                        Why::Freeing => session.recall(lease, false),
                        Why::Holes => session.recall(lease, true),
                        Why::Poisoned(page) => session.poisoned(lease, page),
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Send a line for every fault of this session's mappings to the
    /// daemon (for `daxfs trace`), or stop.
    fn trace(self: &Arc<Self>, on: bool) {
        let weak = Arc::downgrade(self);
        let sink = move |event: &FaultEvent| {
            if let Some(session) = weak.upgrade() {
                session.tell(Request::Trace {
                    line: daxfs_client::trace::line(event),
                });
            }
        };
        self.counters
            .set_trace(on.then(|| Arc::new(sink) as daxfs::dax::TraceSink));
    }

    /// In a child after `fork`: connect anew, so that the daemon knows
    /// this process and recalls what it maps (the grants inherited are the
    /// parent's leases, forgotten here; the caller asks again).
    pub fn reconnect(self: &Arc<Self>) -> std::result::Result<(), String> {
        let (stream, hello, _device) = handshake(&self.mountpoint)?;
        self.trace(hello.trace);
        {
            let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the parent's reader thread does not exist in this
            // process; its copy of the socket is closed once, here, and
            // never used again.
            unsafe { libc::close(conn.reader) };
            *conn = Conn {
                stream: stream.try_clone().map_err(|e| e.to_string())?,
                reader: -1,
                pid: std::process::id(),
            };
        }
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.start(stream)
    }

    /// Ask, and wait for the answer.
    pub fn ask(&self, request: Request) -> Reply {
        let failed = |message: &str| Reply::Failed {
            errno: libc::EIO,
            message: message.to_string(),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        let pending = Arc::clone(&self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if self.send(&request.to_line(id)).is_err() {
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return failed("the daxfs daemon is gone");
        }
        rx.recv()
            .unwrap_or_else(|_| failed("the daxfs daemon is gone"))
    }

    /// Say something that gets no answer.
    pub fn tell(&self, request: Request) {
        let _ = self.send(&request.to_line(0));
    }

    fn send(&self, line: &str) -> std::io::Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn.pid != std::process::id() {
            return Err(std::io::Error::other("the session is the parent's"));
        }
        let mut w = &conn.stream;
        writeln!(w, "{line}")
    }

    /// The grant of `lease`, asked for if there is none (`Recalled` while
    /// the daemon is breaking the file's layout: the fault asks again).
    pub fn grant<'a>(&self, lease: &'a Arc<Lease>) -> Result<MutexGuard<'a, Option<Grant>>> {
        let mut grant = lease.grant.lock().unwrap_or_else(|e| e.into_inner());
        if grant.is_none() {
            let asked = Request::Lease {
                ino: lease.ino,
                first: lease.first,
                end: lease.end,
            };
            match self.ask(asked) {
                Reply::Granted(g) => {
                    self.leases
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(g.lease, Arc::downgrade(lease));
                    *grant = Some(g);
                }
                Reply::Failed { errno, message } => return Err(failed(errno, message)),
                _ => return Err(Error::Invalid("the daemon answered a lease with nothing")),
            }
        }
        Ok(grant)
    }

    /// Give the grant back, if one is held.
    pub fn give_back(&self, grant: &mut Option<Grant>) {
        if let Some(g) = grant.take() {
            self.leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&g.lease);
            self.tell(Request::Release { lease: g.lease });
        }
    }

    /// Give back every lease of file `ino` in this process: holes of it
    /// got blocks at our own request, which the daemon does not recall
    /// from us (the fault that asked maps them, and unmaps the zero pages
    /// from our other mappings), so every grant of the file may be stale.
    pub fn give_back_file(&self, ino: u64) {
        let leases: Vec<Arc<Lease>> = {
            let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            leases
                .values()
                .filter_map(Weak::upgrade)
                .filter(|l| l.ino == ino)
                .collect()
        };
        for lease in leases {
            let mut grant = lease.grant.lock().unwrap_or_else(|e| e.into_inner());
            self.give_back(&mut grant);
        }
    }

    /// Write back the stores to file `ino` through every mapping of it in
    /// this process (`fsync`), if it has any.
    pub fn write_back(&self, ino: u64) -> Result<()> {
        let file = self
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .and_then(Weak::upgrade);
        match file {
            Some(file) => file.writeback(&self.device),
            None => Ok(()),
        }
    }

    /// The DAX state of file `ino` in this process.
    pub fn file(&self, ino: u64) -> Arc<FileDax> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.retain(|_, f| f.strong_count() > 0);
        if let Some(file) = files.get(&ino).and_then(Weak::upgrade) {
            return file;
        }
        let file = FileDax::new();
        files.insert(ino, Arc::downgrade(&file));
        file
    }

    /// The daemon recalls lease `id`: unmap its range (or, `holes`, only
    /// the holes in it) from every mapping of the file in this process
    /// (waiting for faults in flight), forget the grant, and give the
    /// lease back.
    fn recall(&self, id: u64, holes: bool) {
        let lease = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
            .and_then(|l| l.upgrade());
        if let Some(lease) = lease {
            let _recalling = match holes {
                true => lease.file.recall_holes(lease.first, lease.end),
                false => lease.file.recall(lease.first, lease.end),
            };
            let mut grant = lease.grant.lock().unwrap_or_else(|e| e.into_inner());
            if grant.as_ref().is_some_and(|g| g.lease == id) {
                *grant = None;
            }
        }
        self.tell(Request::Recalled { lease: id });
    }
}

impl Session {
    /// The daemon tells of poison in file page `page` of lease `id`: the
    /// grant learns that its device page is poisoned (so no fault maps it
    /// again), and the page becomes inaccessible in every mapping of the
    /// file here (the next access raises `SIGBUS` with `BUS_MCEERR_AR`),
    /// as the library's memory failure does. The lease stays.
    fn poisoned(&self, id: u64, page: u64) {
        let lease = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .and_then(Weak::upgrade);
        let Some(lease) = lease else {
            self.tell(Request::Poisoned { lease: id, page });
            return;
        };
        {
            let mut grant = lease.grant.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(g) = grant.as_mut().filter(|g| g.lease == id) {
                let pfn = g
                    .extents
                    .iter()
                    .find(|e| e.page <= page && page < e.page + e.pages)
                    .map(|e| e.pfn + (page - e.page));
                if let Some(pfn) = pfn {
                    g.poisoned.push((pfn, 1));
                }
            }
        }
        let (shown, _) = lease.file.poison_page(page, &self.device);
        self.tell(Request::Poisoned { lease: id, page });
        // (After the answer: the program's handler may end the process.)
        daxfs::dax::early_notice(&shown);
    }
}

/// The error a failed request stands for.
pub fn failed(errno: i32, message: String) -> Error {
    match errno {
        libc::EAGAIN => Error::Recalled,
        libc::ENOSPC => Error::NoSpace,
        _ => Error::Busy(message),
    }
}
