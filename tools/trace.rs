//! The mount's fault trace: `daxfs trace MNT` connects to the control
//! socket and gets one line per DAX fault, from every process that maps
//! the mount's files through the preload library (and from mappings the
//! daemon makes itself), for as long as it stays connected.
//!
//! Nobody listening, nothing is traced: clients are told to trace when the
//! first listener comes and to stop when the last goes (a line on their
//! lease session), and a fault that is not traced costs one load. A
//! listener that does not keep up loses lines rather than holding the
//! daemon's memory: it is told how many, as the kernel's trace says
//! `[LOST n EVENTS]`.

use daxfs::Fs;
use daxfs_client::lease::trace_line;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The listeners and the sessions to tell.
#[derive(Default)]
pub struct Traces {
    inner: Mutex<Inner>,
}

/// A `daxfs trace` connection: its queue of lines, and how many lines
/// found it full.
struct Listener {
    queue: SyncSender<String>,
    lost: Arc<AtomicU64>,
}

/// Lines a listener may have waiting.
const QUEUE: usize = 4096;

#[derive(Default)]
struct Inner {
    /// Each `daxfs trace` connection, by id.
    listeners: Vec<(u64, Listener)>,
    /// Each lease session's queue of lines to its client, by id.
    sessions: Vec<(u64, Sender<String>)>,
    next: u64,
}

impl Inner {
    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn tell_sessions(&mut self, on: bool) {
        self.sessions
            .retain(|(_, s)| s.send(trace_line(on)).is_ok());
    }
}

impl Traces {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lease session starts: `out` is its queue of lines to the client,
    /// which hears of every change from now on. Its id (for
    /// `remove_session`), and whether someone traces now (which the
    /// session's hello says).
    pub fn add_session(&self, out: Sender<String>) -> (u64, bool) {
        let mut inner = self.lock();
        let id = inner.id();
        inner.sessions.push((id, out));
        (id, !inner.listeners.is_empty())
    }

    /// The session `id` ended.
    pub fn remove_session(&self, id: u64) {
        self.lock().sessions.retain(|(i, _)| *i != id);
    }

    /// A trace line, from a client or from the daemon's own mappings.
    pub fn line(&self, line: String) {
        let mut inner = self.lock();
        inner
            .listeners
            .retain(|(_, l)| match l.queue.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    l.lost.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
    }

    /// Take over `stream` (a `daxfs trace` connection): send it every
    /// fault's line until it closes.
    pub fn listen(self: &Arc<Self>, fs: &Arc<Fs>, stream: UnixStream) {
        let (queue, lines) = sync_channel::<String>(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let id = {
            let mut inner = self.lock();
            if inner.listeners.is_empty() {
                let traces = Arc::downgrade(self);
                fs.trace_faults(Some(Arc::new(move |event: &daxfs::dax::FaultEvent| {
                    if let Some(traces) = traces.upgrade() {
                        traces.line(daxfs_client::trace::line(event));
                    }
                })));
                inner.tell_sessions(true);
            }
            let id = inner.id();
            let listener = Listener {
                queue,
                lost: Arc::clone(&lost),
            };
            inner.listeners.push((id, listener));
            id
        };
        let mut w = &stream;
        let _ = stream.set_nonblocking(false);
        // The listener knows the trace is on once it reads this.
        let started = writeln!(w, "tracing");
        let mut probe = [0u8; 1];
        while started.is_ok() {
            match lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if say_lost(&mut w, &lost).is_err() || writeln!(w, "{line}").is_err() {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if say_lost(&mut w, &lost).is_err() {
                        break;
                    }
                    // Gone? (A listener never writes: a read that ends is
                    // its close.)
                    let _ = stream.set_nonblocking(true);
                    let gone = matches!((&stream).read(&mut probe), Ok(0));
                    let _ = stream.set_nonblocking(false);
                    if gone {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut inner = self.lock();
        inner.listeners.retain(|(i, _)| *i != id);
        if inner.listeners.is_empty() {
            // Nobody listens any more: stop, here and in every client.
            fs.trace_faults(None);
            inner.tell_sessions(false);
        }
    }
}

/// `daxfs trace PATH`: print the trace lines of the mount holding `path`
/// until interrupted, or until `count` lines.
pub fn follow(path: &std::path::Path, count: Option<u64>) -> Result<(), String> {
    use std::io::BufRead;
    let (mountpoint, _) = crate::control::locate(path)?;
    let at = |e: std::io::Error| format!("{}: {e}", mountpoint.display());
    let stream = daxfs_client::socket::connect(&mountpoint)?;
    let mut w = &stream;
    writeln!(w, "{}", serde_json::json!({ "op": "trace" })).map_err(at)?;
    let mut lines = std::io::BufReader::new(&stream).lines();
    match lines.next() {
        Some(Ok(first)) if first == "tracing" => {}
        Some(Ok(other)) => {
            let v: serde_json::Value = serde_json::from_str(&other).unwrap_or_default();
            return Err(format!(
                "{}: {}",
                mountpoint.display(),
                v["error"].as_str().unwrap_or(&other)
            ));
        }
        _ => {
            return Err(format!(
                "{}: the daemon closed the trace",
                mountpoint.display()
            ))
        }
    }
    eprintln!(
        "daxfs: tracing DAX faults on {} (Ctrl-C stops)",
        mountpoint.display()
    );
    let mut out = std::io::stdout().lock();
    let mut left = count;
    while left != Some(0) {
        match lines.next() {
            Some(Ok(line)) => {
                writeln!(out, "{line}").map_err(at)?;
                out.flush().map_err(at)?;
                left = left.map(|n| n - 1);
            }
            Some(Err(e)) => return Err(at(e)),
            None => {
                return Err(format!(
                    "{}: the daemon ended the trace",
                    mountpoint.display()
                ))
            }
        }
    }
    Ok(())
}

/// Tell the listener how many lines it lost since it was last told.
fn say_lost(w: &mut impl Write, lost: &AtomicU64) -> std::io::Result<()> {
    match lost.swap(0, Ordering::Relaxed) {
        0 => Ok(()),
        n => writeln!(w, "[LOST {n} EVENTS]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// A listener that reads nothing for a while loses lines, never the
    /// daemon's memory: every line is either delivered or counted in a
    /// `[LOST n EVENTS]` line, and clients hear the trace go on and off.
    #[test]
    fn a_listener_that_falls_behind_is_told_what_it_lost() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let dev = daxfs::pmem::Device::create(
            dir.path().join("img"),
            16 << 20,
            &daxfs::pmem::DeviceOptions::new(),
        )
        .unwrap();
        let fs = Arc::new(Fs::format(dev).unwrap());
        let traces = Arc::new(Traces::default());
        let (session, told) = std::sync::mpsc::channel();
        let (id, on) = traces.add_session(session);
        assert!(!on);
        let (ours, theirs) = UnixStream::pair().unwrap();
        // (A line that never comes fails the test rather than hang it.)
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let listening = {
            let (traces, fs) = (Arc::clone(&traces), Arc::clone(&fs));
            std::thread::spawn(move || traces.listen(&fs, theirs))
        };
        let mut lines = std::io::BufReader::new(&ours).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "tracing");
        assert_eq!(told.recv().unwrap(), trace_line(true));
        const SENT: u64 = 100_000;
        for i in 0..SENT {
            traces.line(format!("event {i:06} {}", "x".repeat(80)));
        }
        // Every line comes, or is counted lost (once the queue is drained,
        // the count comes by itself).
        let (mut got, mut lost) = (0u64, 0u64);
        while got + lost < SENT {
            let line = lines.next().unwrap().unwrap();
            match line.strip_prefix("[LOST ") {
                Some(n) => lost += n.trim_end_matches(" EVENTS]").parse::<u64>().unwrap(),
                None => {
                    assert!(
                        line.starts_with(&format!("event {got:06}")) || lost > 0,
                        "{line}"
                    );
                    got += 1;
                }
            }
        }
        assert!(lost > 0, "nothing was lost of {SENT} lines unread");
        assert_eq!(got + lost, SENT);
        drop(lines);
        drop(ours);
        listening.join().unwrap();
        assert_eq!(told.recv().unwrap(), trace_line(false));
        traces.remove_session(id);
        assert!(traces.lock().sessions.is_empty() && traces.lock().listeners.is_empty());
    }
}
