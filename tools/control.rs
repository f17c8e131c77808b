//! The control channel of a running mount: where its socket is and who
//! may use it are in `daxfs_client::socket`.
//!
//! A request is one line of JSON of at most 4 KiB, sent within 10 seconds;
//! the answer one line of JSON: `{"output": TEXT}` to print, or `{"error":
//! TEXT}`. Waiting connections cost a buffer each in one thread (at most
//! 64; beyond, the one that has waited longest is closed), and two threads
//! carry out the requests.
//!
//! The channel is protocol only: what a request does is the business of
//! its [`Handler`] (the daemon's, in `daemon`).

use daxfs_client::mounts;
use daxfs_client::socket::{check_private, peer_is, runtime_dirs, socket_name};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// What carries out a request: its text to print, or the error.
pub trait Handler: Send + Sync {
    fn handle(&self, request: &Value) -> Result<String, String>;
    /// Take over `stream` for a session of the layout-lease protocol
    /// (`daxfs_client::lease`), in the calling thread, until it closes.
    fn session(&self, stream: UnixStream);
    /// Take over `stream` to send it the fault trace until it closes.
    fn trace(&self, stream: UnixStream);
}

/// The longest request line; a longer one is refused unread.
const MAX_REQUEST: usize = 4096;
/// Connections waiting for their request line, at most; beyond, the one
/// that has waited longest is closed (a real client sends its line at
/// once, so it is never that one).
const MAX_WAITING: usize = 64;
/// How long a connection may take to send its request line.
const IDLE: Duration = Duration::from_secs(10);
/// Threads that carry out requests (a scrub must not hold up a stat).
const WORKERS: usize = 2;

/// The mount point holding `path` (a file or directory inside a daxfs
/// mount, or the mount point itself), and `path` relative to it.
pub fn locate(path: &Path) -> Result<(PathBuf, String), String> {
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut at = canonical.as_path();
    loop {
        if mounts::image_of(at).is_some() {
            let inside = canonical.strip_prefix(at).expect("a prefix");
            return Ok((at.to_path_buf(), format!("/{}", inside.display())));
        }
        at = at
            .parent()
            .ok_or_else(|| format!("{}: not inside a daxfs mount", path.display()))?;
    }
}

/// `file` (absolute, or relative to the current directory or to the mount
/// point) as a path inside the mount at `mountpoint`.
pub fn inside(mountpoint: &Path, file: &Path) -> Result<String, String> {
    let candidate = if file.is_absolute() || file.exists() {
        file.to_path_buf()
    } else {
        mountpoint.join(file)
    };
    let (at, inside) = locate(&candidate)?;
    if std::fs::canonicalize(mountpoint).ok() != Some(at) {
        return Err(format!(
            "{}: not in the mount at {}",
            file.display(),
            mountpoint.display()
        ));
    }
    Ok(inside)
}

/// Send `request` to the daemon of `mountpoint` and print its answer.
pub fn print(mountpoint: &Path, request: Value) -> Result<(), String> {
    print!("{}", output(mountpoint, &request)?);
    Ok(())
}

/// Send `request` to the daemon of `mountpoint`; its output text.
pub fn output(mountpoint: &Path, request: &Value) -> Result<String, String> {
    let answer = ask(mountpoint, request)?;
    match (&answer["output"], &answer["error"]) {
        (Value::String(output), _) => Ok(output.clone()),
        (_, Value::String(error)) => Err(error.clone()),
        _ => Err(format!(
            "{}: the daemon's answer makes no sense: {answer}",
            mountpoint.display()
        )),
    }
}

fn ask(mountpoint: &Path, request: &Value) -> Result<Value, String> {
    let stream = daxfs_client::socket::connect(mountpoint)?;
    let _ = stream.set_write_timeout(Some(IDLE));
    let mut writer = &stream;
    writeln!(writer, "{request}").map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    serde_json::from_str(&line).map_err(|_| {
        format!(
            "{}: the daemon closed the control channel without an answer",
            mountpoint.display()
        )
    })
}

/// The daemon's control socket, bound before the filesystem is mounted
/// (so that a mount never goes ahead without its control channel); its
/// file goes when this does.
pub struct Control {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl Control {
    /// Bind the control socket of the mount at `mountpoint`, in the first
    /// runtime directory of ours that is (or can be made) private. A
    /// socket left there by a daemon that died is replaced; one that
    /// answers belongs to a live daemon of the same mount point, and this
    /// mount is refused.
    pub fn bind(mountpoint: &Path) -> Result<Control, String> {
        let uid = nix::unistd::getuid().as_raw();
        let name = socket_name(mountpoint)?;
        let mut why = Vec::new();
        for dir in runtime_dirs(uid) {
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    why.push(format!("{}: {e}", dir.display()));
                    continue;
                }
                _ => {}
            }
            if let Err(e) = check_private(&dir, uid) {
                why.push(e);
                continue;
            }
            let path = dir.join(&name);
            let listener = match UnixListener::bind(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if UnixStream::connect(&path).is_ok() {
                        return Err(format!(
                            "{}: another daxfs daemon serves this mount point (its control \
                             socket {} answers)",
                            mountpoint.display(),
                            path.display()
                        ));
                    }
                    // Its daemon is gone.
                    let _ = std::fs::remove_file(&path);
                    UnixListener::bind(&path)
                }
                other => other,
            };
            match listener {
                Ok(listener) => {
                    return Ok(Control {
                        listener: Some(listener),
                        path,
                    })
                }
                Err(e) => why.push(format!("{}: {e}", path.display())),
            }
        }
        Err(format!(
            "{}: cannot open the control socket: {}",
            mountpoint.display(),
            why.join("; ")
        ))
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve control requests, in threads of their own: one waits for
    /// connections and their request lines (all at once, each within
    /// limits of size and time), a fixed few carry the requests out.
    pub fn serve(&mut self, handler: Arc<dyn Handler>) -> Result<(), String> {
        let listener = self.listener.take().expect("served once");
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let owner = nix::unistd::getuid().as_raw();
        let (queue, requests) = mpsc::sync_channel::<(UnixStream, Vec<u8>)>(MAX_WAITING);
        let requests = Arc::new(Mutex::new(requests));
        for _ in 0..WORKERS {
            let (requests, handler) = (Arc::clone(&requests), Arc::clone(&handler));
            std::thread::Builder::new()
                .name("daxfs-control-worker".into())
                .spawn(move || loop {
                    let next = requests.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((stream, line)) = next else { return };
                    if let Some(kind) = long_lived(&line) {
                        // A thread of its own, for as long as it lasts.
                        let handler = Arc::clone(&handler);
                        let _ = std::thread::Builder::new()
                            .name(kind.thread_name().into())
                            .spawn(move || match kind {
                                LongLived::Session => handler.session(stream),
                                LongLived::Trace => handler.trace(stream),
                            });
                        continue;
                    }
                    // (A request that panics costs its answer, not a worker.)
                    let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        serde_json::from_slice::<Value>(&line)
                            .map_err(|e| format!("bad request: {e}"))
                            .and_then(|request| handler.handle(&request))
                    }));
                    let answer = match answered {
                        Ok(Ok(output)) => json!({ "output": output }),
                        Ok(Err(error)) => json!({ "error": error }),
                        Err(_) => json!({ "error": "the daemon failed to carry out the request" }),
                    };
                    reply(&stream, &answer);
                })
                .map_err(|e| format!("cannot start a control thread: {e}"))?;
        }
        std::thread::Builder::new()
            .name("daxfs-control".into())
            .spawn(move || listen(&listener, owner, &queue))
            .map_err(|e| format!("cannot start the control thread: {e}"))?;
        Ok(())
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A connection that stays open after its request line.
enum LongLived {
    /// A lease session.
    Session,
    /// A fault trace listener.
    Trace,
}

impl LongLived {
    fn thread_name(&self) -> &'static str {
        match self {
            LongLived::Session => "daxfs-lease",
            LongLived::Trace => "daxfs-trace",
        }
    }
}

/// Whether a request line starts a lease session or a trace.
fn long_lived(line: &[u8]) -> Option<LongLived> {
    let v = serde_json::from_slice::<Value>(line).ok()?;
    match v["op"].as_str()? {
        daxfs_client::lease::SESSION => Some(LongLived::Session),
        "trace" => Some(LongLived::Trace),
        _ => None,
    }
}

/// Answer on `stream` (blocking, within the idle limit) and close it.
fn reply(stream: &UnixStream, answer: &Value) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(IDLE));
    let mut writer = stream;
    let _ = writeln!(writer, "{answer}");
}

/// A connection whose request line has not all come.
struct Waiting {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// Accept connections and gather their request lines, all in this thread
/// (an idle connection costs a buffer, not a thread); a peer other than
/// the owner or root is refused before anything is read.
fn listen(listener: &UnixListener, owner: u32, queue: &mpsc::SyncSender<(UnixStream, Vec<u8>)>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut waiting: Vec<Waiting> = Vec::new();
    loop {
        let ready: Vec<bool> = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                waiting
                    .iter()
                    .map(|w| PollFd::new(w.stream.as_fd(), PollFlags::POLLIN)),
            );
            if poll(&mut fds, PollTimeout::from(1000u16)).is_err() {
                continue;
            }
            fds.iter().map(|f| f.any().unwrap_or(true)).collect()
        };
        // Read what came, oldest first; hand over whole lines.
        let mut index = 0;
        waiting.retain_mut(|w| {
            index += 1;
            if !ready[index] {
                return w.since.elapsed() < IDLE; // idle too long: closed
            }
            let mut chunk = [0u8; 1024];
            let n = match w.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            };
            w.line.extend_from_slice(&chunk[..n]);
            let end = w.line.iter().position(|&b| b == b'\n');
            if end.map_or(w.line.len(), |end| end) > MAX_REQUEST {
                let error = format!("request too long: the limit is {MAX_REQUEST} bytes");
                reply(&w.stream, &json!({ "error": error }));
                return false;
            }
            match end {
                Some(end) => {
                    w.line.truncate(end);
                    let Ok(stream) = w.stream.try_clone() else {
                        return false;
                    };
                    let line = std::mem::take(&mut w.line);
                    if let Err(mpsc::TrySendError::Full((stream, _))) =
                        queue.try_send((stream, line))
                    {
                        reply(
                            &stream,
                            &json!({ "error": "the daemon is busy: try again" }),
                        );
                    }
                    false
                }
                None if n == 0 => false, // closed before a whole line
                None => true,
            }
        });
        // New connections: the peer checked first.
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if peer_is(&stream, owner).is_err() {
                        let error =
                            "permission denied: only the mount's owner or root may control it";
                        reply(&stream, &json!({ "error": error }));
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if waiting.len() == MAX_WAITING {
                        waiting.remove(0);
                    }
                    waiting.push(Waiting {
                        stream,
                        line: Vec::new(),
                        since: Instant::now(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
    }
}
