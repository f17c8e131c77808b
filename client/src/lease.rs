//! The layout-lease protocol: how a client that maps a file's device pages
//! itself (the preload library) learns where the pages are, and gives them
//! back before the daemon frees or moves them.
//!
//! A session starts as a control request, `{"op": "dax-session"}`; the
//! daemon answers with a [`Hello`] line that carries the device's file
//! descriptor (`SCM_RIGHTS`): only the mount's owner and root get this far
//! (see [`socket`](crate::socket)). Then both sides send lines of JSON:
//!
//! * the client asks ([`Request`], each with an `id`): the layout of a file
//!   range, which the daemon answers with a [`Grant`] (the extents, the
//!   file size, the poisoned device pages) and holds as a lease until it is
//!   released; blocks for holes before a store (allocated, zeroed and
//!   committed before the answer, which is `MAP_SYNC`'s promise); the file
//!   size. `release` and `recalled` get no answer.
//! * the daemon answers ([`Reply`], with the request's `id`), and, at any
//!   time, recalls a lease (`{"recall": LEASE}`) before it frees or moves
//!   blocks of its range: the client unmaps the range from its mappings,
//!   forgets the grant and says `recalled`; when another process gave
//!   blocks to holes of the range (`"holes": true`), only the holes need
//!   unmapping;
//!   a call that frees waits for that (up to the layout timeout, then it
//!   fails with `EBUSY` and frees nothing). A session that closes gives
//!   back every lease it held. Poison in a page of the range is told the
//!   same way, naming the file page (`{"recall": LEASE, "poisoned":
//!   PAGE}`): the client makes that page inaccessible, keeps the lease and
//!   says so (`poisoned`); memory failure waits for that.
//!
//! A request that meets a recall in progress fails with `EAGAIN`: ask
//! again once the recall is answered (the fault that asked has let go of
//! its locks by then).

use serde_json::{json, Value};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// The control request that starts a session.
pub const SESSION: &str = "dax-session";

/// The daemon's first line: the device (whose descriptor comes with it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub device: PathBuf,
    pub size: u64,
    /// Whether flushes must also `msync` (an image on a disk filesystem).
    pub msync: bool,
    /// Whether someone traces faults now (later changes come as
    /// [`Event::Trace`]).
    pub trace: bool,
}

/// A run of a file's pages on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The first file page.
    pub page: u64,
    /// The device page frame of that page.
    pub pfn: u64,
    pub pages: u64,
}

/// A leased layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub lease: u64,
    /// The file size when granted.
    pub size: u64,
    /// The range's blocks, in file order (holes are not listed).
    pub extents: Vec<Extent>,
    /// Poisoned device pages among them, as `(pfn, pages)`.
    pub poisoned: Vec<(u64, u64)>,
}

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The layout of file pages `[first, end)` of `ino`, as a lease.
    Lease { ino: u64, first: u64, end: u64 },
    /// Blocks for the holes of file pages `[first, end)`, before a store.
    Allocate { ino: u64, first: u64, end: u64 },
    /// The file's size now.
    Size { ino: u64 },
    /// All the file's extents (for FIEMAP).
    Extents { ino: u64 },
    /// The lease is no longer needed (no answer).
    Release { lease: u64 },
    /// The recalled lease is given back (no answer).
    Recalled { lease: u64 },
    /// File page `page` of the lease is inaccessible now (no answer).
    Poisoned { lease: u64, page: u64 },
    /// A fault trace line, while the daemon asks for them (no answer).
    Trace { line: String },
}

/// The daemon's answer to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Granted(Grant),
    Done,
    Size(u64),
    Extents(Vec<Extent>),
    Failed { errno: i32, message: String },
}

/// A line from the daemon, after the hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Reply {
        id: u64,
        reply: Reply,
    },
    /// The lease is recalled, for this reason.
    Recall {
        lease: u64,
        why: Why,
    },
    /// Someone traces faults on the mount (send `Request::Trace` lines),
    /// or nobody does any more.
    Trace(bool),
}

/// The line that turns a client's fault trace on or off.
pub fn trace_line(on: bool) -> String {
    json!({ "trace": on }).to_string()
}

/// Why a lease is recalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Blocks of the range are about to be freed or moved: unmap the
    /// range, give the lease back (`recalled`); the daemon waits for that.
    Freeing,
    /// Holes of the range get blocks (another process wrote there): unmap
    /// the holes (zero pages) only, forget the grant, give the lease back.
    Holes,
    /// File page `page` holds poison: make it inaccessible, keep the
    /// lease, say `poisoned`; memory failure waits for that.
    Poisoned(u64),
}

fn field(v: &Value, name: &str) -> Result<u64, String> {
    v[name]
        .as_u64()
        .ok_or_else(|| format!("{name} missing in {v}"))
}

impl Request {
    /// The request as a line (without the newline).
    pub fn to_line(&self, id: u64) -> String {
        match self {
            Request::Lease { ino, first, end } => {
                json!({"id": id, "op": "lease", "ino": ino, "first": first, "end": end})
            }
            Request::Allocate { ino, first, end } => {
                json!({"id": id, "op": "allocate", "ino": ino, "first": first, "end": end})
            }
            Request::Size { ino } => json!({"id": id, "op": "size", "ino": ino}),
            Request::Extents { ino } => json!({"id": id, "op": "extents", "ino": ino}),
            Request::Release { lease } => json!({"op": "release", "lease": lease}),
            Request::Recalled { lease } => json!({"op": "recalled", "lease": lease}),
            Request::Poisoned { lease, page } => {
                json!({"op": "poisoned", "lease": lease, "page": page})
            }
            Request::Trace { line } => json!({"op": "trace", "line": line}),
        }
        .to_string()
    }

    /// A request line: its id (none for those not answered) and what it
    /// asks.
    pub fn parse(line: &str) -> Result<(u64, Request), String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
        let id = v["id"].as_u64().unwrap_or(0);
        let range = || -> Result<(u64, u64, u64), String> {
            let (first, end) = (field(&v, "first")?, field(&v, "end")?);
            if first >= end {
                return Err(format!("empty page range {first}..{end}"));
            }
            Ok((field(&v, "ino")?, first, end))
        };
        let request = match v["op"].as_str() {
            Some("lease") => {
                let (ino, first, end) = range()?;
                Request::Lease { ino, first, end }
            }
            Some("allocate") => {
                let (ino, first, end) = range()?;
                Request::Allocate { ino, first, end }
            }
            Some("size") => Request::Size {
                ino: field(&v, "ino")?,
            },
            Some("extents") => Request::Extents {
                ino: field(&v, "ino")?,
            },
            Some("release") => Request::Release {
                lease: field(&v, "lease")?,
            },
            Some("recalled") => Request::Recalled {
                lease: field(&v, "lease")?,
            },
            Some("poisoned") => Request::Poisoned {
                lease: field(&v, "lease")?,
                page: field(&v, "page")?,
            },
            Some("trace") => Request::Trace {
                line: v["line"]
                    .as_str()
                    .ok_or_else(|| format!("line missing in {v}"))?
                    .to_string(),
            },
            _ => return Err(format!("unknown request {v}")),
        };
        Ok((id, request))
    }
}

impl Reply {
    /// The answer to request `id` as a line.
    pub fn to_line(&self, id: u64) -> String {
        match self {
            Reply::Granted(g) => json!({
                "id": id,
                "lease": g.lease,
                "size": g.size,
                "extents": g.extents.iter().map(|e| [e.page, e.pfn, e.pages]).collect::<Vec<_>>(),
                "poisoned": g.poisoned.iter().map(|&(p, n)| [p, n]).collect::<Vec<_>>(),
            }),
            Reply::Done => json!({"id": id, "done": true}),
            Reply::Size(size) => json!({"id": id, "size": size}),
            Reply::Extents(extents) => json!({
                "id": id,
                "map": extents.iter().map(|e| [e.page, e.pfn, e.pages]).collect::<Vec<_>>(),
            }),
            Reply::Failed { errno, message } => {
                json!({"id": id, "errno": errno, "error": message})
            }
        }
        .to_string()
    }
}

/// The line that recalls `lease`, saying why.
pub fn recall_line(lease: u64, why: Why) -> String {
    match why {
        Why::Freeing => json!({ "recall": lease }),
        Why::Holes => json!({ "recall": lease, "holes": true }),
        Why::Poisoned(page) => json!({ "recall": lease, "poisoned": page }),
    }
    .to_string()
}

fn triples(v: &Value) -> Result<Vec<Vec<u64>>, String> {
    let Some(list) = v.as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|t| {
            t.as_array()
                .and_then(|t| t.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
                .ok_or_else(|| format!("bad list entry {t}"))
        })
        .collect()
}

fn extents(v: &Value) -> Result<Vec<Extent>, String> {
    Ok(triples(v)?
        .into_iter()
        .filter_map(|t| match t[..] {
            [page, pfn, pages] => Some(Extent { page, pfn, pages }),
            _ => None,
        })
        .collect())
}

impl Event {
    pub fn parse(line: &str) -> Result<Event, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("bad line: {e}"))?;
        if let Some(on) = v["trace"].as_bool() {
            return Ok(Event::Trace(on));
        }
        if let Some(lease) = v["recall"].as_u64() {
            let why = match (v["poisoned"].as_u64(), v["holes"].as_bool()) {
                (Some(page), _) => Why::Poisoned(page),
                (None, Some(true)) => Why::Holes,
                _ => Why::Freeing,
            };
            return Ok(Event::Recall { lease, why });
        }
        let id = field(&v, "id")?;
        let reply = if let Some(errno) = v["errno"].as_i64() {
            Reply::Failed {
                errno: errno as i32,
                message: v["error"].as_str().unwrap_or("").to_string(),
            }
        } else if let Some(lease) = v["lease"].as_u64() {
            let extents = extents(&v["extents"])?;
            let poisoned = triples(&v["poisoned"])?
                .into_iter()
                .filter_map(|t| match t[..] {
                    [pfn, pages] => Some((pfn, pages)),
                    _ => None,
                })
                .collect();
            Reply::Granted(Grant {
                lease,
                size: field(&v, "size")?,
                extents,
                poisoned,
            })
        } else if v.get("map").is_some() {
            Reply::Extents(extents(&v["map"])?)
        } else if let Some(size) = v["size"].as_u64() {
            Reply::Size(size)
        } else {
            Reply::Done
        };
        Ok(Event::Reply { id, reply })
    }
}

impl Hello {
    /// Send the hello line with the device's descriptor.
    pub fn send(&self, stream: &UnixStream, device: RawFd) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let line = format!(
            "{}\n",
            json!({
                "device": self.device, "size": self.size, "msync": self.msync,
                "trace": self.trace,
            })
        );
        let fds = [device];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(line.as_bytes())];
        sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
        Ok(())
    }

    /// Receive the hello line and the device's descriptor (the daemon sends
    /// them in one message, before anything else).
    pub fn receive(stream: &UnixStream) -> Result<(Hello, OwnedFd), String> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("no answer to the session request: {e}"))?;
        let mut fd = None;
        for cmsg in msg.cmsgs().map_err(|e| e.to_string())? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor in
                    // our table for us; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        let n = msg.bytes;
        let line = std::str::from_utf8(&buf[..n]).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(line.trim_end()).map_err(|e| {
            format!("the daemon refused the session: {}", line.trim_end()) + &format!(" ({e})")
        })?;
        if let Some(error) = v["error"].as_str() {
            return Err(format!("the daemon refused the session: {error}"));
        }
        let hello = Hello {
            device: PathBuf::from(v["device"].as_str().ok_or("no device in the hello")?),
            size: field(&v, "size")?,
            msync: v["msync"].as_bool().unwrap_or(true),
            trace: v["trace"].as_bool().unwrap_or(false),
        };
        let fd = fd.ok_or("the hello came without the device")?;
        Ok((hello, fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_it_was_written() {
        let requests = [
            Request::Lease {
                ino: 7,
                first: 0,
                end: 512,
            },
            Request::Allocate {
                ino: 7,
                first: 3,
                end: 4,
            },
            Request::Size { ino: 9 },
            Request::Extents { ino: 9 },
            Request::Release { lease: 4 },
            Request::Recalled { lease: 5 },
            Request::Poisoned { lease: 5, page: 6 },
            Request::Trace {
                line: "dax_pmd_fault_done: \"x\"".into(),
            },
        ];
        for r in requests {
            let (id, back) = Request::parse(&r.to_line(11)).unwrap();
            let r = &r;
            assert_eq!(&back, r);
            if matches!(
                r,
                Request::Lease { .. }
                    | Request::Allocate { .. }
                    | Request::Size { .. }
                    | Request::Extents { .. }
            ) {
                assert_eq!(id, 11);
            }
        }
        assert!(Request::parse(r#"{"op":"lease","ino":1,"first":5,"end":5}"#).is_err());
        let grant = Grant {
            lease: 3,
            size: 1 << 30,
            extents: vec![Extent {
                page: 0,
                pfn: 512,
                pages: 1024,
            }],
            poisoned: vec![(513, 1)],
        };
        let replies = [
            Reply::Granted(grant),
            Reply::Done,
            Reply::Size(0),
            Reply::Extents(vec![]),
            Reply::Extents(vec![Extent {
                page: 1,
                pfn: 2,
                pages: 3,
            }]),
            Reply::Failed {
                errno: 11,
                message: "busy".into(),
            },
        ];
        for r in replies {
            assert_eq!(
                Event::parse(&r.to_line(2)).unwrap(),
                Event::Reply { id: 2, reply: r }
            );
        }
        for on in [true, false] {
            assert_eq!(Event::parse(&trace_line(on)).unwrap(), Event::Trace(on));
        }
        for why in [Why::Freeing, Why::Holes, Why::Poisoned(3)] {
            assert_eq!(
                Event::parse(&recall_line(8, why)).unwrap(),
                Event::Recall { lease: 8, why }
            );
        }
    }
}
