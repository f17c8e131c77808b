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

use crate::device::RemoteDevice;
use daxfs::dax::{DaxCounters, FileDax};
use daxfs_client::lease::{Event, Grant, Hello, Reply, Request, SESSION};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, SyncSender};
use std::sync::{Arc, Mutex, Weak};

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

pub struct Session {
    writer: Mutex<UnixStream>,
    next_id: AtomicU64,
    pending: Arc<Mutex<HashMap<u64, SyncSender<Reply>>>>,
    pub device: RemoteDevice,
    pub counters: DaxCounters,
    /// Leases granted, by id, for the recall thread.
    leases: Arc<Mutex<HashMap<u64, Weak<Lease>>>>,
    /// The DAX state of each file mapped through this session.
    files: Mutex<HashMap<u64, Weak<FileDax>>>,
    /// The process that opened the session (a child after `fork` has none
    /// of its threads, so it may not use it).
    pid: u32,
}

impl Session {
    /// Open a session with the daemon of the mount at `mountpoint`.
    pub fn open(mountpoint: &Path) -> Result<Arc<Session>, String> {
        let stream = daxfs_client::socket::connect(mountpoint)?;
        let mut w = &stream;
        writeln!(w, "{}", serde_json_line(SESSION)).map_err(|e| e.to_string())?;
        let (hello, fd): (Hello, _) = Hello::receive(&stream)?;
        let device = RemoteDevice::open(fd, &hello)?;
        let reader = stream.try_clone().map_err(|e| e.to_string())?;
        let session = Arc::new(Session {
            writer: Mutex::new(stream),
            next_id: AtomicU64::new(1),
            pending: Arc::new(Mutex::new(HashMap::new())),
            device,
            counters: DaxCounters::default(),
            leases: Arc::new(Mutex::new(HashMap::new())),
            files: Mutex::new(HashMap::new()),
            pid: std::process::id(),
        });
        let (recalls, recalled) = channel::<u64>();
        let pending = Arc::clone(&session.pending);
        std::thread::Builder::new()
            .name("daxfs-preload-in".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
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
                        Ok(Event::Recall { lease }) => {
                            let _ = recalls.send(lease);
                        }
                        Err(_) => {}
                    }
                }
                // The daemon is gone: nobody will answer.
                pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
            })
            .map_err(|e| e.to_string())?;
        let weak = Arc::downgrade(&session);
        std::thread::Builder::new()
            .name("daxfs-preload-recall".into())
            .spawn(move || {
                for lease in recalled {
                    let Some(session) = weak.upgrade() else {
                        return;
                    };
                    session.recall(lease);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(session)
    }

    /// Whether this process may use the session (not a child after fork).
    pub fn usable(&self) -> bool {
        self.pid == std::process::id()
    }

    /// Ask, and wait for the answer.
    pub fn ask(&self, request: Request) -> Reply {
        let failed = |message: &str| Reply::Failed {
            errno: libc::EIO,
            message: message.to_string(),
        };
        if !self.usable() {
            return failed("the daxfs session belongs to the parent process");
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if self.send(&request.to_line(id)).is_err() {
            self.pending
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
        if self.usable() {
            let _ = self.send(&request.to_line(0));
        }
    }

    fn send(&self, line: &str) -> std::io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(w, "{line}")
    }

    /// Keep `lease` for the recall thread.
    pub fn register(&self, id: u64, lease: &Arc<Lease>) {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::downgrade(lease));
    }

    /// Forget lease `id` (given back or replaced).
    pub fn forget(&self, id: u64) {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Give back every lease of file `ino` in this process: holes of it
    /// got blocks at our own request, which the daemon does not recall
    /// from us (the fault that asked maps them, and unmaps the zero pages
    /// from our other mappings), so every grant of the file may be stale.
    pub fn give_back_file(&self, ino: u64) {
        let leases: Vec<(u64, Arc<Lease>)> = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let mine: Vec<u64> = leases
                .iter()
                .filter(|(_, l)| l.upgrade().is_some_and(|l| l.ino == ino))
                .map(|(&id, _)| id)
                .collect();
            mine.into_iter()
                .filter_map(|id| Some((id, leases.remove(&id)?.upgrade()?)))
                .collect()
        };
        for (id, lease) in leases {
            let mut grant = lease.grant.lock().unwrap_or_else(|e| e.into_inner());
            if grant.as_ref().is_some_and(|g| g.lease == id) {
                *grant = None;
            }
            drop(grant);
            self.tell(Request::Release { lease: id });
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

    /// The daemon recalls lease `id`: unmap its range from every mapping
    /// of the file in this process (waiting for faults in flight), forget
    /// the grant, and give the lease back.
    fn recall(&self, id: u64) {
        let lease = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
            .and_then(|l| l.upgrade());
        if let Some(lease) = lease {
            let _recalling = lease.file.recall(lease.first, lease.end);
            let mut grant = lease.grant.lock().unwrap_or_else(|e| e.into_inner());
            if grant.as_ref().is_some_and(|g| g.lease == id) {
                *grant = None;
            }
        }
        self.tell(Request::Recalled { lease: id });
    }
}

fn serde_json_line(op: &str) -> String {
    format!("{{\"op\":\"{op}\"}}")
}
