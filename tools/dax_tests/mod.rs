//! `daxfs dax-tests`: an ndctl-style DAX test suite, run through the
//! library, through a FUSE mount, and through the mount with the preload
//! library (`daxfs exec`), with a pass/fail table.
//!
//! Every test runs in a process of its own (as ndctl's tests are programs
//! of their own): a test installs a SIGBUS handler, may `mlockall`, and
//! forks, none of which should outlive it or meet another test. The parent
//! starts `daxfs dax-tests --case NAME --via library|DIR`, waits for it
//! (killing it after `--timeout`), and fills the table from its exit
//! status and its notes.

mod cases;
mod sigbus;
mod target;

use crate::size::parse_size;
use cases::{CaseFn, Ctx};
use clap::Args;
use daxfs::pmem::{Device, DeviceOptions};
use daxfs::Fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DaxTestsArgs {
    /// Run the mount column in this daxfs mount (in a directory of its own,
    /// removed afterwards) instead of a temporary mount of the suite's own.
    #[arg(long, value_name = "DIR", conflicts_with = "library_only")]
    mount: Option<PathBuf>,
    /// Run through the library only (no FUSE mount).
    #[arg(long)]
    library_only: bool,
    /// Run only the tests whose names contain one of these words.
    #[arg(long, value_name = "WORD")]
    only: Vec<String>,
    /// Where the library's emulated devices (and the temporary mount's
    /// image) go; by default /dev/shm, else the temporary directory.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Size of the file the mmap tests map (ndctl's uses 1G).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    mmap_size: u64,
    /// Seconds after which a test counts as hung, and is killed.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// (Internal) run this one test in this process...
    #[arg(long, hide = true, requires = "via")]
    case: Option<String>,
    /// (Internal) ...through `library`, or in this directory of a mount.
    #[arg(long, hide = true)]
    via: Option<String>,
}

/// A test of the suite.
struct Case {
    name: String,
    run: CaseFn,
    /// Why it cannot run through a mount, if it cannot.
    library_only: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let case = |name: &str, run: CaseFn| Case {
        name: name.to_string(),
        run,
        library_only: None,
    };
    let mut all = vec![
        case("dax-pmd", cases::dax_pmd),
        case("dax-errors", cases::dax_errors),
        case("pmem-errors", cases::pmem_errors),
        case("dax-poison", cases::dax_poison),
        case("truncate-mapped", cases::truncate_mapped),
    ];
    for flags in cases::MMAP_FLAGS {
        all.push(case(&format!("mmap {flags}"), cases::mmap));
    }
    all.push(Case {
        library_only: Some(
            "pins are a library call; a FUSE client's read and write are copies the daemon makes under the file's lock, so nothing outside the library holds a pin",
        ),
        ..case("break-layouts", cases::break_layouts)
    });
    all
}

pub fn run(args: DaxTestsArgs) -> Result<(), String> {
    if let (Some(name), Some(via)) = (&args.case, &args.via) {
        return run_case(&args, name, via);
    }
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|w| c.name.contains(w.as_str())))
        .collect();
    if selected.is_empty() {
        return Err(format!(
            "no test matches {:?}; the tests: {}",
            args.only,
            cases()
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    // The mount column: a directory in the given mount, or in one of ours.
    let mount: Result<MountDir, String> = if args.library_only {
        Err("not asked for (--library-only)".to_string())
    } else {
        match &args.mount {
            Some(at) => MountDir::inside(at),
            None => MountDir::temporary(&dir, image_size(args.mmap_size)),
        }
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    println!(
        "daxfs dax-tests: library on emulated devices in {}; mount: {}",
        dir.display(),
        match &mount {
            Ok(m) => m.dir.display().to_string(),
            Err(why) => format!("none ({why})"),
        }
    );
    let preload = crate::exec::library();
    println!(
        "{:<16} {:<8} {:<8} {:<8}",
        "test", "library", "mount", "preload"
    );
    let mut notes: Vec<String> = Vec::new();
    let mut note = |text: String| -> String {
        let n = match notes.iter().position(|n| *n == text) {
            Some(i) => i + 1,
            None => {
                notes.push(text);
                notes.len()
            }
        };
        format!("({n})")
    };
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut failures = Vec::new();
    for case in &selected {
        let mut cells = Vec::new();
        let mut marks = Vec::new();
        let in_mount = match (&mount, case.library_only) {
            (_, Some(why)) => Err(format!("library only: {why}")),
            (Ok(m), None) => Ok(m.dir.display().to_string()),
            (Err(why), None) => Err(format!("no mount: {why}")),
        };
        let preloaded = match (&in_mount, &preload) {
            (Ok(dir), Ok(_)) => Ok(dir.clone()),
            (Err(why), _) => Err(why.clone()),
            (_, Err(why)) => Err(why.clone()),
        };
        let vias: [Result<String, String>; 3] = [Ok("library".to_string()), in_mount, preloaded];
        for (column, via) in ["library", "mount", "preload"].into_iter().zip(vias) {
            let via = match via {
                Ok(via) => via,
                Err(why) => {
                    skipped += 1;
                    cells.push("skip".to_string());
                    marks.push(note(why));
                    continue;
                }
            };
            let with = match column {
                "preload" => preload.as_ref().ok().map(PathBuf::as_path),
                _ => None,
            };
            let outcome = spawn_case(&exe, &args, &dir, &case.name, &via, with);
            for text in &outcome.notes {
                marks.push(note(format!("{column}: {text}")));
            }
            if outcome.passed {
                passed += 1;
                cells.push("pass".to_string());
            } else {
                failed += 1;
                cells.push("FAIL".to_string());
                failures.push((format!("{} ({column})", case.name), outcome.output));
            }
        }
        marks.dedup();
        println!(
            "{:<16} {:<8} {:<8} {:<8} {}",
            case.name,
            cells[0],
            cells[1],
            cells[2],
            marks.join(" ")
        );
    }
    for (i, text) in notes.iter().enumerate() {
        println!("({}) {text}", i + 1);
    }
    for (name, output) in &failures {
        println!("\n{name} failed:\n{}", output.trim_end());
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    drop(mount);
    if failed > 0 {
        Err(format!("{failed} of the DAX tests failed"))
    } else {
        Ok(())
    }
}

/// What a test's process said.
struct Outcome {
    passed: bool,
    notes: Vec<String>,
    /// Everything it printed (shown when it failed).
    output: String,
}

/// Run test `name` through `via` in a process of its own, with the
/// library `preload` preloaded if given.
fn spawn_case(
    exe: &Path,
    args: &DaxTestsArgs,
    dir: &Path,
    name: &str,
    via: &str,
    preload: Option<&Path>,
) -> Outcome {
    let fail = |output: String| Outcome {
        passed: false,
        notes: Vec::new(),
        output,
    };
    let mut command = Command::new(exe);
    if let Some(library) = preload {
        command.env("LD_PRELOAD", library);
    }
    let mut child = match command
        .arg("dax-tests")
        .args(["--case", name, "--via", via])
        .arg("--dir")
        .arg(dir)
        .arg("--mmap-size")
        .arg(args.mmap_size.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return fail(format!("cannot start the test: {e}")),
    };
    // Read both pipes while waiting, so a chatty test cannot block on them.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {} s, killed", args.timeout));
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    let notes = out
        .lines()
        .filter_map(|l| l.strip_prefix("note: "))
        .map(str::to_string)
        .collect();
    let output = format!("{out}{err}");
    match status {
        Ok(status) if status.success() => Outcome {
            passed: true,
            notes,
            output,
        },
        Ok(status) => fail(format!("{output}(exit: {status})")),
        Err(why) => fail(format!("{output}({why})")),
    }
}

/// The size of a device for the tests: room for the mmap tests' file
/// twice over, and for the others.
fn image_size(mmap_size: u64) -> u64 {
    (2 * mmap_size + (64 << 20)).next_multiple_of(2 << 20)
}

/// The child: run test `name` through `via` and exit.
fn run_case(args: &DaxTestsArgs, name: &str, via: &str) -> Result<(), String> {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("no test named {name:?}"))?;
    sigbus::install();
    let library;
    let mount;
    let t: &dyn target::Target = if via == "library" {
        let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
        let label: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        library = target::Library::new(&dir, &label, image_size(args.mmap_size))?;
        &library
    } else {
        mount = target::Mount::new(Path::new(via))?;
        &mount
    };
    let cx = Ctx {
        t,
        name,
        mmap_size: args.mmap_size,
        notes: Default::default(),
    };
    let result = (case.run)(&cx);
    for text in cx.notes.borrow().iter() {
        println!("note: {text}");
    }
    result
}

/// The directory of a mount the mount column runs in; removed (and a
/// temporary mount unmounted, whatever happened) on drop.
struct MountDir {
    dir: PathBuf,
    temporary: Option<TemporaryMount>,
}

impl MountDir {
    fn inside(mountpoint: &Path) -> Result<MountDir, String> {
        Ok(MountDir {
            dir: Self::make_dir(mountpoint)?,
            temporary: None,
        })
    }

    fn make_dir(mountpoint: &Path) -> Result<PathBuf, String> {
        if daxfs_client::mounts::image_of(mountpoint).is_none() {
            return Err(format!("{}: not a daxfs mount point", mountpoint.display()));
        }
        let dir = mountpoint.join(format!("dax-tests.{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(dir)
    }

    fn temporary(base: &Path, size: u64) -> Result<MountDir, String> {
        let top = base.join(format!("daxfs-dax-tests.{}", std::process::id()));
        std::fs::create_dir(&top).map_err(|e| format!("{}: {e}", top.display()))?;
        let mut temporary = TemporaryMount {
            top: top.clone(),
            mnt: top.join("mnt"),
            daemon: None,
        };
        let image = top.join("pmem0.img");
        let dev = Device::create(&image, size, &DeviceOptions::new())
            .map_err(|e| format!("{}: {e}", image.display()))?;
        Fs::format(dev)
            .and_then(Fs::into_device)
            .map_err(|e| format!("{}: cannot format: {e}", image.display()))?;
        let out = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .arg("mount")
            .arg(&image)
            .arg(&temporary.mnt)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run daxfs mount: {e}"))?;
        let said = String::from_utf8_lossy(&out.stdout);
        temporary.daemon = said
            .split("daemon pid ")
            .nth(1)
            .and_then(|s| s.trim().trim_end_matches(')').parse().ok());
        if !out.status.success() {
            return Err(format!(
                "cannot mount a temporary image: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(MountDir {
            dir: Self::make_dir(&temporary.mnt)?,
            temporary: Some(temporary),
        })
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        self.temporary.take();
    }
}

/// A mount of a new image of the suite's own.
struct TemporaryMount {
    top: PathBuf,
    mnt: PathBuf,
    daemon: Option<i32>,
}

impl Drop for TemporaryMount {
    fn drop(&mut self) {
        if daxfs_client::mounts::image_of(&self.mnt).is_some() {
            let unmounted = std::env::current_exe()
                .and_then(|exe| {
                    Command::new(exe)
                        .arg("umount")
                        .arg(&self.mnt)
                        .stdin(Stdio::null())
                        .output()
                })
                .is_ok_and(|out| out.status.success());
            if !unmounted {
                let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Some(pid) = self.daemon {
            // The daemon exits once unmounted; if not soon, kill it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: signalling the daemon this suite started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.top);
    }
}
