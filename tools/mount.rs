//! `daxfs mount` and `daxfs umount`.
//!
//! The daemon is this same program run with `--foreground`. Without it,
//! `mount` starts the daemon in a session of its own with a pipe on its
//! standard output and returns once the daemon writes that the mount is
//! ready (the FUSE handshake is done), or fails with what the daemon wrote
//! on standard error. In the foreground, SIGINT and SIGTERM unmount: a
//! thread waits for them (blocked everywhere else) and unmounts the
//! session, whose loop then ends; the filesystem is then unmounted cleanly.

use crate::fuse::DaxFuse;
use clap::Args;
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::Fs;
use daxfs_client::images::{default_image, DEFAULT_SIZE};
use daxfs_client::mounts::{image_of, mounted_at};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
#[command(after_long_help = WHERE_DATA_LIVES)]
pub struct MountArgs {
    /// The device: an image file (created, 1 GiB and sparse, and formatted
    /// when missing) or /dev/daxX.Y. By default /dev/shm/daxfs-USER/pmem0.img,
    /// in memory (see below).
    image: Option<PathBuf>,
    /// Where to mount it (created when missing).
    #[arg(default_value = "mnt")]
    mountpoint: PathBuf,
    /// Mount options, comma separated: `ro`; `allow_other` (other users may
    /// use the mount); `cache` (file data through the kernel's page cache
    /// instead of direct I/O); `threads=N` (request threads, default 2);
    /// `nodefault_permissions` (no permission checks by the kernel); `dev`
    /// (device nodes on the mount open their devices) and `suid` (set-ID
    /// bits take effect on exec), both off by default and root's only;
    /// `relatime` (the default), `noatime` or `strictatime`: when reads
    /// update access times, as for any Linux filesystem;
    /// `layout_timeout=SECONDS` (default 30): how long a truncate or punch
    /// waits for programs that map the range directly (`daxfs exec`) or pin
    /// it to give it back, before it fails with EBUSY and frees nothing;
    /// `fast`: for an image on a disk filesystem, persist without `msync`
    /// (memory speed, but a machine crash can lose recent writes; the
    /// daemon crashing loses nothing).
    #[arg(short = 'o', value_delimiter = ',', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground; Ctrl-C or SIGTERM unmounts.
    #[arg(long, short)]
    foreground: bool,
    /// (Internal) write "ready" on standard output once mounted.
    #[arg(long, hide = true)]
    notify_ready: bool,
}

/// The reasoning behind the default image, for `mount --help`.
const WHERE_DATA_LIVES: &str = "\
Where the data lives:
  An emulated pmem device stands in for memory, as Linux's own emulation
  (memmap=) does, so by default the image lives in memory: in a directory of
  your own on the tmpfs at /dev/shm (/dev/shm/daxfs-USER/pmem0.img; made 1 GiB
  and sparse, or smaller when less memory is free there). Durable writes then
  cost a cache flush. The image survives the daemon and every process
  crashing, and unmounting; it does not survive a reboot.

  For a filesystem that survives reboots, name an image on a disk filesystem
  (daxfs mount ~/pmem0.img mnt). Every persist then also waits for msync, many
  times slower; -o fast skips that at the price of what a machine crash
  catches in flight. /dev/daxX.Y is real (or emulated) pmem: durable once
  flushed, across power loss.

  /dev/shm maps its memory with 4 KiB pages; for 2 MiB pages under DAX
  mappings (programs run with daxfs exec, or the library), make the image
  first with daxfs create --huge, which places it on a huge-page tmpfs.

  The first line of every mount says which of these it is. DAXFS_IMAGES=DIR
  puts default images in DIR; ./pmem0.img, made by earlier versions, is still
  the default in its directory.";

#[derive(Args)]
pub struct UmountArgs {
    /// The mount point.
    mountpoint: PathBuf,
    /// Give up waiting for the daemon to finish after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

struct Options {
    read_only: bool,
    allow_other: bool,
    cache: bool,
    threads: usize,
    default_permissions: bool,
    dev: bool,
    suid: bool,
    atime: daxfs::Atime,
    layout_timeout: std::time::Duration,
    fast: bool,
}

fn parse_options(list: &[String]) -> Result<Options, String> {
    let mut o = Options {
        read_only: false,
        allow_other: false,
        cache: false,
        threads: 2,
        default_permissions: true,
        dev: false,
        suid: false,
        atime: daxfs::Atime::Relatime,
        layout_timeout: daxfs::DEFAULT_LAYOUT_TIMEOUT,
        fast: false,
    };
    for opt in list.iter().filter(|s| !s.is_empty()) {
        match opt.split_once('=') {
            None if opt == "ro" => o.read_only = true,
            None if opt == "rw" => o.read_only = false,
            None if opt == "allow_other" => o.allow_other = true,
            None if opt == "cache" => o.cache = true,
            None if opt == "default_permissions" => o.default_permissions = true,
            None if opt == "nodefault_permissions" => o.default_permissions = false,
            None if opt == "dev" || opt == "nodev" => o.dev = opt == "dev",
            None if opt == "suid" || opt == "nosuid" => o.suid = opt == "suid",
            None if opt == "relatime" => o.atime = daxfs::Atime::Relatime,
            None if opt == "noatime" => o.atime = daxfs::Atime::NoAtime,
            None if opt == "strictatime" => o.atime = daxfs::Atime::StrictAtime,
            None if opt == "fast" => o.fast = true,
            Some(("threads", n)) => {
                o.threads = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| format!("-o threads={n}: give a number from 1 to 64"))?
            }
            Some(("layout_timeout", s)) => {
                let secs: f64 = s
                    .parse()
                    .ok()
                    .filter(|s: &f64| (0.0..=86400.0).contains(s))
                    .ok_or_else(|| {
                        format!("-o layout_timeout={s}: give seconds, from 0 to 86400")
                    })?;
                o.layout_timeout = std::time::Duration::from_secs_f64(secs);
            }
            _ => {
                return Err(format!(
                    "unknown mount option {opt:?} (known: ro, rw, allow_other, cache, \
                     threads=N, default_permissions, nodefault_permissions, dev, nodev, suid, \
                     nosuid, relatime, noatime, strictatime, layout_timeout=SECONDS, fast)"
                ))
            }
        }
    }
    Ok(o)
}

/// The mount's first line: where its data lives, and what it survives.
fn where_data_lives(image: &Path, info: &pmem::DeviceInfo) -> String {
    use pmem::{DeviceKind, PersistenceMode};
    let mode = info.persistence.mode;
    let on = match &info.kind {
        DeviceKind::DevDax { name } => format!("is {name}, a device-dax device"),
        DeviceKind::Emulated => format!("is on {}", info.filesystem),
    };
    let hint = match mode {
        PersistenceMode::Memory => {
            "; for one that survives reboots, name an image on a disk (daxfs mount --help)"
        }
        PersistenceMode::Msync => "; for memory speed, keep it on a tmpfs or mount with -o fast",
        _ => "",
    };
    format!(
        "{} {on} ({}): {}{hint}",
        image.display(),
        mode.medium(),
        mode.survives()
    )
}

/// Whether `at` is a FUSE mount whose daemon is gone (the kernel answers
/// "transport endpoint is not connected").
fn is_dead_mount(at: &Path) -> bool {
    std::fs::metadata(at).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

pub fn mount(args: MountArgs) -> Result<(), String> {
    let options = parse_options(&args.options)?;
    let (image, size, note) = match &args.image {
        Some(image) => (image.clone(), DEFAULT_SIZE, None),
        None => {
            let default = default_image()?;
            (default.path, default.size, default.note)
        }
    };
    // A mount whose daemon died (killed, crashed) is left to the kernel;
    // it is detached, and the image is free to mount again.
    for at in [mounted_at(&image), Some(args.mountpoint.clone())]
        .into_iter()
        .flatten()
    {
        if is_dead_mount(&at) {
            nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| format!("{}: cannot detach a dead mount: {e}", at.display()))?;
            eprintln!("daxfs: detached {}, whose daemon had died", at.display());
        }
    }
    if let Some(at) = mounted_at(&image) {
        return Err(format!(
            "{}: already mounted at {}",
            image.display(),
            at.display()
        ));
    }
    wait_for_previous_daemon(&image, &args.mountpoint)?;
    if args.mountpoint.exists() && !args.mountpoint.is_dir() {
        return Err(format!(
            "{}: not a directory: the mount point must be a directory",
            args.mountpoint.display()
        ));
    }
    let mut said = Vec::from_iter(note);
    if !image.exists() {
        let dev = Device::create(&image, size, &DeviceOptions::new()).map_err(|e| e.to_string())?;
        Fs::format(dev)
            .and_then(Fs::into_device)
            .map_err(|e| format!("{}: cannot format: {e}", image.display()))?;
        said.push(format!(
            "created {} ({}, sparse) with a new filesystem",
            image.display(),
            crate::size::human(size)
        ));
    }
    if !args.mountpoint.exists() {
        std::fs::create_dir_all(&args.mountpoint)
            .map_err(|e| format!("{}: cannot create: {e}", args.mountpoint.display()))?;
    }
    // Said after the daemon's first line, which says where the data lives.
    let said = move || said.iter().for_each(|s| println!("daxfs: {s}"));
    if args.foreground {
        serve(&image, &args, &options, said)
    } else {
        spawn_daemon(&image, &args, said)
    }
}

/// How long `daxfs mount` waits for the daemon of an earlier mount of the
/// same image or mount point to finish (it frees files unlinked while
/// open, and writes back, after the kernel has let go of the mount).
const PREVIOUS_DAEMON_WAIT: Duration = Duration::from_secs(120);

/// A plain `umount` returns before the daemon has finished; a new mount of
/// the same image or mount point waits for it, saying so, as Linux makes a
/// new mount wait for the end of the old one.
fn wait_for_previous_daemon(image: &Path, mountpoint: &Path) -> Result<(), String> {
    let by_image = match image.exists() {
        true => pmem::device_holder(image).ok().flatten(),
        false => None,
    };
    let by_mountpoint = match mountpoint.is_dir() && image_of(mountpoint).is_none() {
        true => daxfs_client::socket::daemon_at(mountpoint),
        false => None,
    };
    for pid in [by_image, by_mountpoint].into_iter().flatten() {
        if !is_daxfs_daemon(pid) {
            continue; // (the open that follows names it)
        }
        eprintln!(
            "daxfs: waiting for the daemon of the previous mount (pid {pid}) to finish unmounting"
        );
        if !wait_for_exit(pid, PREVIOUS_DAEMON_WAIT) {
            return Err(format!(
                "{}: the daemon of the previous mount (pid {pid}) is still running after {} \
                 seconds",
                image.display(),
                PREVIOUS_DAEMON_WAIT.as_secs()
            ));
        }
    }
    Ok(())
}

/// Whether process `pid` is a daxfs mount daemon.
fn is_daxfs_daemon(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|&b| b == 0);
    let program = args.next().unwrap_or_default();
    program.ends_with(b"daxfs") && args.next() == Some(b"mount".as_slice())
}

/// Wait until process `pid` has exited (its pidfd becomes readable), for
/// at most `limit`; whether it has.
fn wait_for_exit(pid: u32, limit: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // SAFETY: a descriptor just opened, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match poll(&mut [PollFd::new(fd.as_fd(), PollFlags::POLLIN)], timeout) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Start the daemon and wait until it says the mount is ready, passing on
/// what it says before (after its first line, `said`).
fn spawn_daemon(image: &Path, args: &MountArgs, said: impl FnOnce()) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(image)
        .arg(&args.mountpoint)
        .arg("--foreground")
        .arg("--notify-ready");
    if !args.options.is_empty() {
        cmd.arg("-o").arg(args.options.join(","));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the daemon: {e}"))?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut said = Some(said);
    let mut line = String::new();
    while stdout.read_line(&mut line).is_ok_and(|n| n > 0) {
        match line.trim_end().split_once(' ') {
            Some(("say", text)) => println!("daxfs: {text}"),
            Some(("warn", text)) => eprintln!("daxfs: {text}"),
            _ if line.trim() == "ready" => {
                if let Some(said) = said.take() {
                    said();
                }
                println!(
                    "mounted {} at {} (daemon pid {})",
                    image.display(),
                    args.mountpoint.display(),
                    child.id()
                );
                return Ok(());
            }
            _ => break,
        }
        if let Some(said) = said.take() {
            said();
        }
        line.clear();
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let reason = stderr.trim().trim_start_matches("daxfs: ").to_string();
    Err(if reason.is_empty() {
        format!("the daemon exited ({status}) before the mount was ready")
    } else {
        reason
    })
}

/// The daemon: mount, serve until unmounted, then unmount the filesystem.
fn serve(
    image: &Path,
    args: &MountArgs,
    options: &Options,
    said: impl FnOnce(),
) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    // Signals are taken by one thread; every thread started after this
    // inherits the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let image = std::fs::canonicalize(image).map_err(|e| format!("{}: {e}", image.display()))?;
    // A read-only mount never writes the image: what mounting replays or
    // reclaims happens in the daemon's memory.
    let device_options = DeviceOptions::new()
        .read_only(options.read_only)
        .fast(options.fast);
    let dev = Device::open(&image, &device_options).map_err(|e| e.to_string())?;
    // What the user sees first: where the data lives, what survives what.
    // (Through the parent, when there is one: it reads our standard output
    // until "ready".)
    let say = |kind: &str, text: &str| match args.notify_ready {
        true => println!("{kind} {text}"),
        false => eprintln!("daxfs: {text}"),
    };
    say("say", &where_data_lives(&image, &dev.info()));
    said();
    let fs =
        Arc::new(Fs::mount(dev).map_err(|e| format!("{}: cannot mount: {e}", image.display()))?);
    fs.set_atime(options.atime);
    fs.set_layout_timeout(options.layout_timeout);
    for note in fs.mount_notes() {
        say("warn", note);
    }
    let mut mount_options = vec![
        fuser::MountOption::FSName(image.to_string_lossy().into_owned()),
        fuser::MountOption::Subtype("daxfs".into()),
        if options.dev {
            fuser::MountOption::Dev
        } else {
            fuser::MountOption::NoDev
        },
        if options.suid {
            fuser::MountOption::Suid
        } else {
            fuser::MountOption::NoSuid
        },
    ];
    if options.read_only {
        mount_options.push(fuser::MountOption::RO);
    }
    if options.default_permissions {
        mount_options.push(fuser::MountOption::DefaultPermissions);
    }
    let mut config = fuser::Config::default();
    config.mount_options = mount_options;
    // (The options are for fusermount3; the kernel mount below spells them
    // itself.)
    config.n_threads = Some(options.threads);
    config.clone_fd = true;
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    let adapter = DaxFuse::new(Arc::clone(&fs), !options.cache, options.default_permissions);
    let counters = Arc::clone(&adapter.counters);
    let mnt = args.mountpoint.clone();
    // The control socket first: no mount without it.
    let mut control = crate::control::Control::bind(&mnt)?;
    let (session, mut unmounter) = match kernel_mount(&image, &mnt, options) {
        // As root: the mount system call, with type fuse.daxfs.
        Ok(fd) => {
            // The kernel keeps other users out unless allow_other
            // (fuse_allow_current_process), so fuser need not filter by the
            // request's uid, which idmapped mounts leave out of most.
            let adapter = adapter.with_idmap();
            let session = fuser::Session::from_fd(adapter, fd, fuser::SessionACL::All, config)
                .map_err(|e| format!("{}: FUSE handshake failed: {e}", mnt.display()))?;
            (session, None)
        }
        // Otherwise through fusermount3.
        Err(nix::errno::Errno::EPERM) => {
            let mut session = fuser::Session::new(adapter, &mnt, &config)
                .map_err(|e| format!("{}: cannot mount: {e}", mnt.display()))?;
            let unmounter = session.unmount_callable();
            (session, Some(unmounter))
        }
        Err(e) => return Err(format!("{}: cannot mount: {e}", mnt.display())),
    };
    let daemon = Arc::new(crate::daemon::Daemon {
        fs: Arc::clone(&fs),
        image: image.clone(),
        notifier: Some(session.notifier()),
        counters,
        events: Default::default(),
        invalidations: Default::default(),
        control_socket: control.path().to_path_buf(),
        cached: options.cache,
        traces: Default::default(),
    });
    daemon.watch_failures()?;
    control.serve(daemon)?;
    std::thread::Builder::new()
        .name("daxfs-signals".into())
        .spawn(move || {
            if signals.wait().is_ok() {
                match unmounter.as_mut() {
                    Some(unmounter) => drop(unmounter.unmount()),
                    None => {
                        use nix::mount::{umount2, MntFlags};
                        // Files still open: detach now, finish when closed.
                        if umount2(&mnt, MntFlags::empty()).is_err() {
                            let _ = umount2(&mnt, MntFlags::MNT_DETACH);
                        }
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    if args.notify_ready {
        // The parent is waiting for this line; after it nobody reads our
        // output, so it goes to /dev/null.
        println!("ready");
        let _ = std::io::stdout().flush();
        quiet();
    }
    let served = session.run();
    let unmounted = fs.unmount_wait(Duration::from_secs(10));
    served.map_err(|e| {
        format!(
            "{}: the FUSE session failed: {e}",
            args.mountpoint.display()
        )
    })?;
    unmounted.map_err(|e| format!("{}: unmount: {e}", image.display()))
}

/// Mount `/dev/fuse` at `mnt` with the mount system call (root only), so
/// that the mount table shows type `fuse.daxfs` and the image as source.
fn kernel_mount(
    image: &Path,
    mnt: &Path,
    options: &Options,
) -> Result<std::os::fd::OwnedFd, nix::errno::Errno> {
    use nix::mount::MsFlags;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let errno =
        |e: std::io::Error| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(errno)?;
    let root_mode = std::fs::metadata(mnt).map_err(errno)?.mode() & libc::S_IFMT;
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={},group_id={}",
        fuse.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if options.default_permissions {
        data.push_str(",default_permissions");
    }
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MsFlags::empty();
    if !options.dev {
        flags |= MsFlags::MS_NODEV;
    }
    if !options.suid {
        flags |= MsFlags::MS_NOSUID;
    }
    if options.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some(image),
        mnt,
        Some("fuse.daxfs"),
        flags,
        Some(data.as_str()),
    )?;
    Ok(fuse.into())
}

/// Point standard output and error at /dev/null (the daemon's parent has
/// stopped reading them).
fn quiet() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto the standard descriptors of this process; the
        // source is a valid open file, and nothing holds a borrowed handle of
        // the old descriptors' files across this call.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

pub fn umount(args: UmountArgs) -> Result<(), String> {
    let at = &args.mountpoint;
    let image = image_of(at).ok_or_else(|| format!("{}: not a daxfs mount point", at.display()))?;
    match nix::mount::umount2(at, nix::mount::MntFlags::empty()) {
        Ok(()) => {}
        Err(nix::errno::Errno::EBUSY) => {
            return Err(format!(
                "{}: busy (files are open in it, or a process is inside it)",
                at.display()
            ))
        }
        Err(nix::errno::Errno::EPERM) => {
            let status = Command::new("fusermount3")
                .arg("-u")
                .arg(at)
                .status()
                .map_err(|e| format!("{}: cannot run fusermount3: {e}", at.display()))?;
            if !status.success() {
                return Err(format!("{}: fusermount3 -u failed", at.display()));
            }
        }
        Err(e) => return Err(format!("{}: cannot unmount: {e}", at.display())),
    }
    // The daemon checkpoints and releases the image: wait for that, so the
    // image can be used as soon as this returns.
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        // (A test of the lock, not an open: a read-only image cannot be
        // opened for writing, and a read-only daemon's lock is shared.)
        match daxfs::pmem::device_in_use(&image) {
            Ok(false) => return Ok(()),
            Ok(true) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(true) => {
                return Err(format!(
                    "{}: unmounted, but the daemon still holds the image {}",
                    at.display(),
                    image.display()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "{}: unmounted, but the daemon still holds the image: {e}",
                    at.display()
                ))
            }
        }
    }
}
