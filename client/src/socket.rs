//! Where a mount's control socket is, and how to reach it safely.
//!
//! The daemon listens on a Unix socket named after the mount point (a hash
//! of its canonical path) in a directory private to the user who mounted
//! it (`/run/daxfs` for root, `/run/user/UID/daxfs` for others, or
//! `/tmp/daxfs-UID`; mode 0700, as systemd's runtime directories), so that
//! no other user can take its name first or answer in its place. Both
//! ends check: the daemon serves only the mount's owner and root (its
//! peer's `SO_PEERCRED`, looked at before anything is read), and a client
//! talks only to a socket in a directory private to the mount's owner (its
//! `user_id`), served by that owner or root ([`connect`]).

use crate::mounts;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Where the control sockets of `uid`'s mounts may live, in order: a
/// directory only `uid` can write to, in /run (as systemd's runtime
/// directories), and /tmp for a machine without one.
pub fn runtime_dirs(uid: u32) -> Vec<PathBuf> {
    let first = match uid {
        0 => PathBuf::from("/run/daxfs"),
        _ => PathBuf::from(format!("/run/user/{uid}/daxfs")),
    };
    vec![first, PathBuf::from(format!("/tmp/daxfs-{uid}"))]
}

/// Whether `dir` is private to `uid`: a directory (not a symlink) that
/// `uid` owns and nobody else may enter or change. Then only `uid` and
/// root can have made a socket in it.
pub fn check_private(dir: &Path, uid: u32) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    if meta.uid() != uid {
        return Err(format!(
            "{} belongs to uid {}, not {uid}: remove it",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is open to others (mode {:o}): it must be 0700",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The socket's file name for `mountpoint`: a hash of its canonical path
/// (FNV-1a, stable across runs, unlike the std hasher).
pub fn socket_name(mountpoint: &Path) -> Result<String, String> {
    let canonical =
        std::fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let hash = canonical
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    Ok(format!("{hash:016x}.sock"))
}

/// The pid of a daemon of ours that still answers on the control socket
/// of `mountpoint` (one that is finishing an unmount, when nothing is
/// mounted there).
pub fn daemon_at(mountpoint: &Path) -> Option<u32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let uid = nix::unistd::getuid().as_raw();
    let name = socket_name(mountpoint).ok()?;
    runtime_dirs(uid)
        .into_iter()
        .filter(|dir| check_private(dir, uid).is_ok())
        .find_map(|dir| {
            let stream = UnixStream::connect(dir.join(&name)).ok()?;
            let cred = getsockopt(&stream, PeerCredentials).ok()?;
            (cred.uid() == uid).then_some(cred.pid() as u32)
        })
}

/// Whether the peer of `stream` is `owner` or root (`SO_PEERCRED`); else
/// the peer's uid (`u32::MAX` when unknown).
pub fn peer_is(stream: &UnixStream, owner: u32) -> Result<(), u32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(stream, PeerCredentials) {
        Ok(cred) if cred.uid() == 0 || cred.uid() == owner => Ok(()),
        Ok(cred) => Err(cred.uid()),
        Err(_) => Err(u32::MAX),
    }
}

/// A connection to the daemon of the daxfs mount at `mountpoint`, for the
/// mount's owner or root: a socket in a directory private to the owner,
/// served by the owner or root. Errors name the mount point.
pub fn connect(mountpoint: &Path) -> Result<UnixStream, String> {
    let at = |e: String| format!("{}: {e}", mountpoint.display());
    let owner = mounts::owner_of(mountpoint).ok_or_else(|| at("not a daxfs mount".into()))?;
    let me = nix::unistd::getuid().as_raw();
    if me != 0 && me != owner {
        return Err(at(format!(
            "permission denied: the mount belongs to uid {owner}; only it and root may \
             control it"
        )));
    }
    let name = socket_name(mountpoint)?;
    let sockets: Vec<PathBuf> = runtime_dirs(owner)
        .into_iter()
        .map(|d| d.join(&name))
        .collect();
    // Only a socket in a directory private to the mount's owner is its
    // daemon's: anything else is someone else's.
    let socket = sockets
        .iter()
        .find(|s| s.parent().is_some_and(|d| check_private(d, owner).is_ok()) && s.exists())
        .ok_or_else(|| {
            at(format!(
                "no control socket of this mount (looked for {}); is it a daxfs mount of this \
                 version?",
                sockets[0].display()
            ))
        })?;
    connect_at(socket, owner).map_err(at)
}

/// A connection to the socket at `socket`, whose daemon must run as
/// `owner` (or root).
pub fn connect_at(socket: &Path, owner: u32) -> Result<UnixStream, String> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the daemon of this mount at {} ({e})",
            socket.display()
        )
    })?;
    peer_is(&stream, owner).map_err(|uid| {
        format!(
            "the control socket {} is served by uid {uid}, not the mount's owner ({owner}): \
             its answers are not trusted",
            socket.display()
        )
    })?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// A server run as `nobody` (through setpriv and perl, both in every
    /// Debian) that answers every connection to `socket` with a forged
    /// reply; killed when dropped.
    struct Forger(std::process::Child);

    impl Forger {
        fn start(socket: &Path) -> Forger {
            let script = r#"
                use IO::Socket::UNIX; $SIG{PIPE} = "IGNORE";
                my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $ARGV[0], Listen => 8)
                    or die "bind: $!";
                $| = 1; print "ready\n";
                while (my $c = $s->accept) { my $l = <$c>; print $c "{\"output\":\"forged\\n\"}\n"; close $c; }
            "#;
            let mut child = std::process::Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "perl",
                    "-e",
                    script,
                ])
                .arg(socket)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line, "ready\n");
            Forger(child)
        }
    }

    impl Drop for Forger {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The command trusts only a daemon of the mount's owner or root: a
    /// reply from another user's socket is refused, naming who served it.
    #[test]
    fn a_reply_forged_by_another_user_is_refused() {
        if !nix::unistd::getuid().is_root() {
            return; // (setpriv needs root)
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let socket = dir.path().join("forged.sock");
        let _forger = Forger::start(&socket);
        let err = connect_at(&socket, 0).unwrap_err();
        assert!(err.contains("served by uid 65534"), "{err}");
        // The same socket, were nobody the mount's owner: answered.
        let stream = connect_at(&socket, 65534).unwrap();
        writeln!(&stream, "{{\"op\":\"stat\"}}").unwrap();
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).unwrap();
        assert_eq!(answer, "{\"output\":\"forged\\n\"}\n");
    }

    /// A directory that others may write to, or that another user owns,
    /// is not private: a socket in it is not trusted.
    #[test]
    fn only_a_private_directory_is_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        check_private(dir.path(), me).unwrap();
        let err = check_private(dir.path(), me + 1).unwrap_err();
        assert!(err.contains(&format!("belongs to uid {me}")), "{err}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = check_private(dir.path(), me).unwrap_err();
        assert!(err.contains("open to others"), "{err}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/", &link).unwrap();
        assert!(check_private(&link, 0).is_err(), "a symlink");
    }
}
