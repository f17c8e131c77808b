//! The `daxfs` command: create, describe, poison and scrub pmem devices.

mod control;
mod daemon;
mod dax_tests;
mod exec;
mod fuse;
mod huge;
mod layout;
mod leases;
mod mount;
mod populate;
mod size;
mod trace;

use clap::{Args, Parser, Subcommand};
use daxfs_client::mounts;
use pmem::{BadRange, Device, DeviceInfo, DeviceKind, DeviceOptions, SECTOR};
use serde_json::json;
use size::{human, parse_size};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// daxfs: a persistent-memory DAX filesystem in userspace.
///
/// A device is either an emulated one (a file, best placed on a tmpfs such as
/// /dev/shm, created with `daxfs create`) or a real /dev/daxX.Y. Poison is kept
/// in 512-byte sectors, as Linux's badblocks and ndctl count it.
#[derive(Parser)]
#[command(name = "daxfs", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an emulated pmem device (a sparse file) and describe it.
    Create(CreateArgs),
    /// Describe a device: size, persistence mode and why, huge pages, poison.
    Info(InfoArgs),
    /// Poison 512-byte sectors of a device, like `ndctl inject-error`.
    ///
    /// Loads through a mapping of a poisoned page then raise SIGBUS, and
    /// machine-check-safe reads stop at the first poisoned sector.
    #[command(group = clap::ArgGroup::new("where").required(true))]
    InjectError(InjectArgs),
    /// List a device as JSON, in the style of `ndctl list`.
    List(ListArgs),
    /// Clear poisoned sectors (they read as zeros afterwards).
    #[command(group = clap::ArgGroup::new("what").required(true))]
    ClearErrors(ClearArgs),
    /// Read the whole device, as an address-range scrub does, and report poison.
    Scrub(TargetArg),
    /// Show a file's extents: file offset, device offset, length, and
    /// whether each is an aligned 2 MiB region (FUSE has no FIEMAP, so
    /// `filefrag` cannot tell).
    Extents(ExtentsArgs),
    /// Show a running mount's counters: requests, errors, poison events and
    /// their owners, inodes left referenced.
    Stat(PathArg),
    /// Print a line for every DAX fault on a mount, as the kernel's
    /// `fs_dax` trace events do (`dax_pmd_fault_done` ... `NOPAGE`,
    /// `FALLBACK` with its reason, `dax_pte_fault_done`, `SIGBUS`), until
    /// Ctrl-C.
    ///
    /// Faults are those of programs that map the mount's files through the
    /// preload library (`daxfs exec`); a plain FUSE mapping is the
    /// kernel's page cache, which takes no DAX faults. Tracing is on while
    /// someone runs this, and costs nothing otherwise.
    Trace(TraceArgs),
    /// Make a daxfs filesystem on a device (creating the image with --size).
    Mkfs(MkfsArgs),
    /// Mount a filesystem with FUSE (by default an image in memory,
    /// /dev/shm/daxfs-USER/pmem0.img, created when missing, at ./mnt).
    ///
    /// Returns once the mount is ready; the daemon keeps serving it in the
    /// background until `daxfs umount` (or umount) unmounts it. The first
    /// line says where the data lives and what it survives.
    Mount(mount::MountArgs),
    /// Unmount a daxfs mount and wait until the daemon has written
    /// everything back and released the image.
    Umount(mount::UmountArgs),
    /// Run the ndctl-style DAX test suite (dax-pmd, dax-errors, dax-poison,
    /// the 18 mmap flag sets, break layouts) through the library and
    /// through a FUSE mount, and print a pass/fail table.
    ///
    /// Each test runs in a process of its own, on an emulated device of its
    /// own (the library) or in a directory of the mount. Exit status 0 when
    /// no test failed.
    DaxTests(dax_tests::DaxTestsArgs),
    /// Run a program whose mappings of files on daxfs mounts map the
    /// device's own pages (true DAX: PMD and PTE faults, MAP_SYNC, SIGBUS
    /// with BUS_MCEERR_AR on poison), through the preload library.
    ///
    /// Only the mount's owner and root get direct mappings; anyone else,
    /// and a mount with `-o cache`, gets the kernel's FUSE mappings. Covers
    /// programs that map through libc's mmap (not statically linked ones,
    /// nor raw `syscall(SYS_mmap)`).
    Exec(exec::ExecArgs),
    /// Check a filesystem; with --repair, fix what can be fixed.
    ///
    /// The check reads everything a mount reads (superblocks, journal,
    /// bitmap, every inode, directory, extent, xattr block and symlink),
    /// goes on past damage and names each damaged structure with its device
    /// offset. Without --repair it writes nothing (the image is opened
    /// read-only; what a mount would replay happens in memory). --repair
    /// repairs as e2fsck does: checksums rewritten where the fields are
    /// sound, damaged entries and inodes cleared, blocks owned twice copied,
    /// what nothing names reconnected in /lost+found, link counts and the
    /// bitmap set right.
    ///
    /// Exit codes as fsck(8): 0 clean, 1 errors corrected, 4 errors left
    /// uncorrected, 8 operational error (the image could not be checked).
    Fsck(FsckArgs),
}

#[derive(Args)]
struct TraceArgs {
    /// The mount point (or a file in the mount).
    path: PathBuf,
    /// Stop after this many lines.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

#[derive(Args)]
struct MkfsArgs {
    /// The device: an emulated image file or /dev/daxX.Y.
    image: PathBuf,
    /// Create the image with this size first (a multiple of 2 MiB, at least 16 MiB).
    #[arg(long, short, value_parser = parse_size)]
    size: Option<u64>,
    /// Overwrite a device that already holds a daxfs filesystem.
    #[arg(long, short)]
    force: bool,
    /// Fill the new filesystem with a copy of this directory tree (as
    /// `mke2fs -d` does): files, directories, symlinks, FIFOs, sockets,
    /// device nodes, hard links, modes, owners and times.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
}

#[derive(Args)]
struct FsckArgs {
    /// The device: an emulated image file or /dev/daxX.Y (by default the
    /// image `daxfs mount` mounts when given none).
    image: Option<PathBuf>,
    /// Repair what is found. Without it the image is opened read-only and
    /// not one byte of it changes.
    #[arg(long, short)]
    repair: bool,
}

#[derive(Args)]
struct TargetArg {
    /// The device: an emulated image file, /dev/daxX.Y, or a daxfs mount point.
    image: PathBuf,
}

#[derive(Args)]
struct PathArg {
    /// A file in a daxfs mount (for `stat`, the mount point).
    path: PathBuf,
}

#[derive(Args)]
struct ExtentsArgs {
    /// A file in a daxfs mount.
    path: PathBuf,
    /// Print JSON (`file_offset`, `device_offset`, `length`, `aligned_2mib`
    /// per extent) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CreateArgs {
    /// Where to create the image (by default where `daxfs mount` keeps it:
    /// /dev/shm/daxfs-USER/pmem0.img).
    image: Option<PathBuf>,
    /// Size: a multiple of 2 MiB, at least 16 MiB (for example 512M, 1G).
    #[arg(long, short, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Place the image on memory mapped with 2 MiB pages: its own directory if
    /// that is a huge-page tmpfs or hugetlbfs, else (as root) a tmpfs mounted
    /// huge=always at /run/daxfs/huge, with IMAGE a symbolic link to it.
    #[arg(long)]
    huge: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// The device: an emulated image file or /dev/daxX.Y (by default the
    /// image `daxfs mount` mounts when given none).
    image: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InjectArgs {
    /// The device: an emulated image file, /dev/daxX.Y, or the mount point
    /// of a running daxfs mount (which then handles the memory failure).
    image: PathBuf,
    /// Aim at a file in the mount: --offset is then a byte offset in it, and
    /// the device sectors that hold it are poisoned.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Byte offset of the first byte to poison (the sector holding it is poisoned).
    #[arg(long, group = "where", value_parser = parse_size)]
    offset: Option<u64>,
    /// Number of the first 512-byte sector to poison.
    #[arg(long, group = "where")]
    block: Option<u64>,
    /// How many 512-byte sectors to poison.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
}

#[derive(Args)]
struct ListArgs {
    /// The device: an emulated image file, /dev/daxX.Y, or a daxfs mount point.
    image: PathBuf,
    /// Include the poisoned ranges ("badblocks", in 512-byte sectors).
    #[arg(long, short = 'M')]
    media_errors: bool,
}

#[derive(Args)]
struct ClearArgs {
    /// The device: an emulated image file, /dev/daxX.Y, or a daxfs mount point.
    image: PathBuf,
    /// Byte offset of the first sector to clear (a multiple of 512).
    #[arg(long, group = "what", requires = "count", value_parser = parse_size)]
    offset: Option<u64>,
    /// How many 512-byte sectors to clear.
    #[arg(long, requires = "offset", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Clear every poisoned sector.
    #[arg(long, group = "what", conflicts_with_all = ["offset", "count"])]
    all: bool,
}

/// Exit code of fsck(8) for an operational error.
const FSCK_OPERATIONAL: u8 = 8;

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`daxfs list img | head -1`), as Unix tools
    // do, instead of panicking on the failed write.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread
    // starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Command::Fsck(args) = &cli.command {
        return fsck(args);
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("daxfs: {message}");
            ExitCode::FAILURE
        }
    }
}

type Outcome = Result<(), String>;

fn run(command: Command) -> Outcome {
    match command {
        Command::Create(args) => create(args),
        Command::Info(args) => {
            let image = image_or_default(args.image)?;
            let dev = open_read_only(&image)?;
            let info = dev.info();
            // Read without a mount. The usage needs one, which would replay
            // the journal: not while it holds transactions to replay (so that
            // `info` shows a crashed image as it is) or needs a check.
            let layout = layout::layout_json(&dev);
            let usage = match &layout {
                Ok(l) if l["needs_check"] == true => {
                    Err("not shown: the filesystem needs a check (daxfs fsck --repair)".to_string())
                }
                Ok(l) if l["journal"]["pending_transactions"].as_u64() > Some(0) => Err(format!(
                    "not shown: the journal holds {} transactions to replay (the next mount or fsck replays them)",
                    l["journal"]["pending_transactions"]
                )),
                _ => filesystem_usage(dev),
            };
            if args.json {
                let mut value = device_json(&info, None);
                if let Ok(layout) = &layout {
                    value["layout"] = layout.clone();
                }
                value["filesystem_usage"] = match &usage {
                    Ok(u) => json!({
                        "blocks": u.blocks, "free_blocks": u.free_blocks,
                        "inodes": u.inodes, "free_inodes": u.free_inodes,
                        "aligned_2mib_fraction": u.huge_fraction,
                    }),
                    Err(why) => json!({ "none": why }),
                };
                print_json(&value);
            } else {
                print_info(&image, &info);
                match usage {
                    Ok(u) => println!(
                        "  filesystem:   daxfs, {} of {} used, {} of {} inodes free, {:.1}% of file data in aligned 2 MiB extents",
                        human((u.blocks - u.free_blocks) * 4096),
                        human(u.blocks * 4096),
                        u.free_inodes,
                        u.inodes,
                        u.huge_fraction * 100.0
                    ),
                    Err(why) if layout.is_ok() => println!("  filesystem:   daxfs, usage {why}"),
                    Err(why) => println!("  filesystem:   none ({why})"),
                }
                if let Ok(layout) = &layout {
                    print_layout(layout);
                }
            }
            Ok(())
        }
        Command::InjectError(args) => inject(args),
        Command::List(args) if mounts::image_of(&args.image).is_some() => control::print(
            &args.image,
            json!({ "op": "list", "media_errors": args.media_errors }),
        ),
        Command::List(args) => {
            let dev = open_read_only(&args.image)?;
            let badblocks = args.media_errors.then(|| dev.badblocks());
            print_json(&device_json(&dev.info(), badblocks.as_deref()));
            Ok(())
        }
        Command::ClearErrors(args) => clear(args),
        Command::Scrub(args) => scrub(&args.image),
        Command::Extents(args) => {
            let (mountpoint, inside) = control::locate(&args.path)?;
            control::print(
                &mountpoint,
                json!({ "op": "extents", "path": inside, "json": args.json }),
            )
        }
        Command::Stat(args) => {
            let (mountpoint, _) = control::locate(&args.path)?;
            control::print(&mountpoint, json!({ "op": "stat" }))
        }
        Command::Trace(args) => trace::follow(&args.path, args.count),
        Command::Mkfs(args) => mkfs(args),
        Command::Mount(args) => mount::mount(args),
        Command::Umount(args) => mount::umount(args),
        Command::DaxTests(args) => dax_tests::run(args),
        Command::Exec(args) => exec::exec(args),
        Command::Fsck(_) => unreachable!("fsck exits with its own codes, above"),
    }
}

fn mkfs(args: MkfsArgs) -> Outcome {
    let exists = args.image.exists();
    let dev = match (exists, args.size) {
        (false, Some(size)) => {
            Device::create(&args.image, size, &DeviceOptions::new()).map_err(|e| e.to_string())?
        }
        (false, None) => {
            return Err(format!(
                "{}: does not exist; give --size to create it (for example --size 1G)",
                args.image.display()
            ))
        }
        (true, size) => {
            let dev = open(&args.image)?;
            if let Some(size) = size.filter(|&s| s != dev.size()) {
                return Err(format!(
                    "{}: exists with {} bytes, not the {size} asked for",
                    args.image.display(),
                    dev.size()
                ));
            }
            let mut magic = [0u8; 8];
            dev.read(0, &mut magic).map_err(on(&args.image))?;
            if magic == daxfs::format::MAGIC && !args.force {
                return Err(format!(
                    "{}: already holds a daxfs filesystem; use --force to overwrite it",
                    args.image.display()
                ));
            }
            dev
        }
    };
    let fs = daxfs::Fs::format(dev).map_err(|e| format!("{}: {e}", args.image.display()))?;
    if let Some(from) = &args.from {
        let copied = populate::copy_tree(&fs, from)?;
        println!(
            "{}: copied {} files ({}), {} directories, {} symlinks, {} special files, {} hard \
             links from {}",
            args.image.display(),
            copied.files,
            human(copied.bytes),
            copied.dirs,
            copied.symlinks,
            copied.special,
            copied.links,
            from.display(),
        );
    }
    let st = fs.statfs();
    println!(
        "{}: daxfs filesystem of {} ({} data blocks of 4 KiB, {} inodes, {} free 2 MiB regions)",
        args.image.display(),
        human(fs.device().size()),
        st.blocks,
        st.files,
        st.free_huge_regions
    );
    fs.into_device()
        .map_err(|e| format!("{}: {e}", args.image.display()))?;
    Ok(())
}

fn fsck(args: &FsckArgs) -> ExitCode {
    let image = match image_or_default(args.image.clone()) {
        Ok(image) => image,
        Err(e) => {
            eprintln!("daxfs: {e}");
            return ExitCode::from(FSCK_OPERATIONAL);
        }
    };
    let name = image.display();
    // A check writes nothing: the image is opened read-only (so an
    // immutable or read-only image can be checked), and what a mount would
    // replay or reclaim happens in memory.
    let opened = if args.repair {
        open(&image)
    } else {
        open_read_only(&image)
    };
    let dev = match opened {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("daxfs: {e}");
            return ExitCode::from(FSCK_OPERATIONAL);
        }
    };
    match daxfs::fsck(dev, args.repair) {
        Err(e) => {
            eprintln!("daxfs: {name}: cannot check: {e}");
            ExitCode::from(FSCK_OPERATIONAL)
        }
        Ok((report, _dev)) => {
            for note in &report.notes {
                println!("{name}: {note}");
            }
            for p in &report.problems {
                let state = if p.fixed {
                    "FIXED"
                } else if args.repair {
                    "NOT FIXED"
                } else {
                    "ERROR"
                };
                println!("{name}: {state}: {}", p.what);
            }
            if report.is_clean() {
                println!("{name}: clean");
            }
            ExitCode::from(report.exit_code() as u8)
        }
    }
}

/// The image named, or the default one (see `daxfs mount --help`).
fn image_or_default(image: Option<PathBuf>) -> Result<PathBuf, String> {
    match image {
        Some(image) => Ok(image),
        None => daxfs_client::images::default_image().map(|d| d.path),
    }
}

fn open(image: &Path) -> Result<Device, String> {
    Device::open(image, &DeviceOptions::new()).map_err(|e| e.to_string())
}

/// Open for reading only: nothing this process stores reaches the image.
fn open_read_only(image: &Path) -> Result<Device, String> {
    Device::open(image, &DeviceOptions::new().read_only(true)).map_err(|e| e.to_string())
}

/// An error of an operation on an open device, which names the device.
fn on(image: &Path) -> impl Fn(pmem::Error) -> String + '_ {
    move |e| {
        let message = e.to_string();
        if message.starts_with(&image.display().to_string()) {
            message
        } else {
            format!("{}: {message}", image.display())
        }
    }
}

fn create(args: CreateArgs) -> Outcome {
    let image = image_or_default(args.image)?;
    pmem::validate_size(args.size).map_err(|e| format!("{}: {e}", image.display()))?;
    let mut target = image.clone();
    if args.huge {
        if image.symlink_metadata().is_ok() {
            return Err(format!(
                "{}: already exists; refusing to overwrite it",
                image.display()
            ));
        }
        match huge::place(&image) {
            huge::Placement::InPlace => {}
            huge::Placement::Linked(real) => target = real,
            huge::Placement::Refused(why) => {
                eprintln!("daxfs: note: not using huge pages: {why}");
            }
        }
    }
    let dev = Device::create(&target, args.size, &DeviceOptions::new()).map_err(|e| {
        let hint = match e {
            pmem::Error::AlreadyExists { .. } => {
                format!(" (describe it with `daxfs info {}`)", target.display())
            }
            _ => String::new(),
        };
        format!("{e}{hint}")
    })?;
    if target != image {
        if let Err(e) = std::os::unix::fs::symlink(&target, &image) {
            drop(dev);
            let _ = std::fs::remove_file(&target);
            return Err(format!(
                "{}: cannot link to {}: {e}",
                image.display(),
                target.display()
            ));
        }
        println!(
            "created {} on huge-page memory, linked from {}",
            target.display(),
            image.display()
        );
    } else {
        println!("created {}", image.display());
    }
    print_info(&image, &dev.info());
    Ok(())
}

fn inject(args: InjectArgs) -> Outcome {
    let len = args
        .count
        .checked_mul(SECTOR)
        .ok_or_else(|| format!("--count {} is too large", args.count))?;
    if let Some(mountpoint) = mounts::image_of(&args.image).map(|_| args.image.clone()) {
        let request = match (&args.file, args.offset, args.block) {
            (Some(file), Some(offset), _) => json!({
                "op": "inject_file", "path": control::inside(&mountpoint, file)?,
                "offset": offset, "len": len,
            }),
            (Some(_), None, _) => {
                return Err("--file needs --offset (a byte offset in the file)".into())
            }
            (None, _, _) => json!({ "op": "inject", "offset": sector_offset(&args)?, "len": len }),
        };
        return control::print(&mountpoint, request);
    }
    if args.file.is_some() {
        return Err(format!(
            "{}: --file needs a daxfs mount point, not an image",
            args.image.display()
        ));
    }
    let dev = open(&args.image)?;
    print!(
        "{}",
        inject_on(&dev, &args.image, sector_offset(&args)?, len)?
    );
    Ok(())
}

/// The sector-aligned device offset `--offset` or `--block` names.
fn sector_offset(args: &InjectArgs) -> Result<u64, String> {
    match (args.offset, args.block) {
        (Some(offset), _) => Ok(offset / SECTOR * SECTOR),
        (None, Some(block)) => block
            .checked_mul(SECTOR)
            .ok_or_else(|| format!("sector {block} is past the end of the device")),
        (None, None) => unreachable!("clap requires --offset or --block"),
    }
}

/// Poison `len` bytes at `offset` (sector aligned) of `dev`; what to print.
pub(crate) fn inject_on(
    dev: &Device,
    label: &Path,
    offset: u64,
    len: u64,
) -> Result<String, String> {
    dev.inject(offset, len).map_err(on(label))?;
    Ok(format!(
        "{}: poisoned {} starting at sector {} (device offset {:#x})\n",
        label.display(),
        sectors_text(len / SECTOR),
        offset / SECTOR,
        offset
    ))
}

fn clear(args: ClearArgs) -> Outcome {
    let range = match (args.all, args.offset, args.count) {
        (true, _, _) => None,
        (false, Some(offset), Some(count)) => Some((
            offset,
            count
                .checked_mul(SECTOR)
                .ok_or_else(|| format!("--count {count} is too large"))?,
        )),
        _ => unreachable!("clap requires --offset with --count, or --all"),
    };
    if mounts::image_of(&args.image).is_some() {
        let request = match range {
            None => json!({ "op": "clear_all" }),
            Some((offset, len)) => json!({ "op": "clear", "offset": offset, "len": len }),
        };
        return control::print(&args.image, request);
    }
    let dev = open(&args.image)?;
    print!("{}", clear_on(&dev, &args.image, range)?);
    Ok(())
}

/// Clear `range` (offset, length), or everything; what to print.
pub(crate) fn clear_on(
    dev: &Device,
    label: &Path,
    range: Option<(u64, u64)>,
) -> Result<String, String> {
    match range {
        None => {
            let before: u64 = dev.badblocks().iter().map(|r| r.count).sum();
            dev.clear_all().map_err(on(label))?;
            Ok(format!(
                "{}: cleared {}\n",
                label.display(),
                sectors_text(before)
            ))
        }
        Some((offset, len)) => {
            dev.clear(offset, len).map_err(on(label))?;
            Ok(format!(
                "{}: cleared {} starting at sector {}\n",
                label.display(),
                sectors_text(len / SECTOR),
                offset / SECTOR
            ))
        }
    }
}

fn scrub(image: &Path) -> Outcome {
    if mounts::image_of(image).is_some() {
        return control::print(image, json!({ "op": "scrub" }));
    }
    let dev = open(image)?;
    print!(
        "{}",
        scrub_on(&dev, image, std::io::stderr().is_terminal())?
    );
    Ok(())
}

/// Read all of `dev` and report its poison; what to print.
pub(crate) fn scrub_on(dev: &Device, label: &Path, progress: bool) -> Result<String, String> {
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(dev.size());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "scrubbing {bar:40} {bytes}/{total_bytes} ({eta})",
            )
            .expect("the template is valid"),
        );
        bar
    });
    let report = dev
        .scrub(&mut |done, _| {
            if let Some(bar) = &bar {
                bar.set_position(done);
            }
        })
        .map_err(on(label))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let sectors: u64 = report.poisoned.iter().map(|r| r.count).sum();
    let mut out = format!(
        "{}: scrubbed {} ({} of data read): {} in {} poisoned range{}\n",
        label.display(),
        human(dev.size()),
        human(report.scanned),
        sectors_text(sectors),
        report.poisoned.len(),
        if report.poisoned.len() == 1 { "" } else { "s" }
    );
    for run in &report.poisoned {
        out += &format!(
            "  sectors {}..{} (device offset {:#x}, {} bytes)\n",
            run.sector,
            run.sector + run.count - 1,
            run.offset(),
            run.len()
        );
    }
    Ok(out)
}

struct Usage {
    blocks: u64,
    free_blocks: u64,
    inodes: u64,
    free_inodes: u64,
    huge_fraction: f64,
}

/// Mount the filesystem on `dev` (if there is one) for its usage figures.
fn filesystem_usage(dev: Device) -> Result<Usage, String> {
    let fs = daxfs::Fs::mount(dev).map_err(|e| e.to_string())?;
    let st = fs.statfs();
    let huge_fraction = fs.huge_fraction().map_err(|e| e.to_string())?;
    fs.into_device().map_err(|e| e.to_string())?;
    Ok(Usage {
        blocks: st.blocks,
        free_blocks: st.free_blocks,
        inodes: st.files,
        free_inodes: st.free_files,
        huge_fraction,
    })
}

pub(crate) fn sectors_text(count: u64) -> String {
    format!("{count} sector{}", if count == 1 { "" } else { "s" })
}

fn kind_text(kind: &DeviceKind) -> String {
    match kind {
        DeviceKind::Emulated => "emulated".to_string(),
        DeviceKind::DevDax { name } => format!("devdax ({name})"),
    }
}

/// The layout part of `daxfs info`, in text.
fn print_layout(l: &serde_json::Value) {
    let area = |name: &str, v: &serde_json::Value| {
        println!(
            "  {name:<13} at {:#x}, {}",
            v["offset"].as_u64().unwrap_or(0),
            human(v["length"].as_u64().unwrap_or(0))
        )
    };
    println!("  layout:");
    area("  superblock", &l["superblock"]);
    area("  state block", &l["state_block"]);
    area("  journal", &l["journal"]);
    area("  inode table", &l["inode_table"]);
    area("  bitmap", &l["bitmap"]);
    if !l["bitmap_checksums"].is_null() {
        area("  bitmap sums", &l["bitmap_checksums"]);
    }
    area("  data", &l["data"]);
    area("  backup sb", &l["backup_superblock"]);
    let j = &l["journal"];
    println!(
        "  journal:      {} transactions to replay (tail {}, head {}; {})",
        j["pending_transactions"],
        j["tail"],
        j["head"],
        j["end"].as_str().unwrap_or("")
    );
    if l["needs_check"].as_bool() == Some(true) {
        println!("  needs check:  yes: run `daxfs fsck --repair` before mounting");
    }
}

fn print_info(image: &Path, info: &DeviceInfo) {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!("{}", image.display());
    println!("  path:         {}", info.path.display());
    println!(
        "  kind:         {} on {}",
        kind_text(&info.kind),
        info.filesystem
    );
    println!("  size:         {} ({} bytes)", human(info.size), info.size);
    println!("  alignment:    {}", human(info.align));
    println!(
        "  persistence:  {}: {}",
        info.persistence.mode, info.persistence.reason
    );
    println!(
        "  huge pages:   {}: {}",
        yes_no(info.huge_pages.capable),
        info.huge_pages.reason
    );
    println!(
        "  cpu:          flush with {}, non-temporal stores with {}",
        info.flush,
        info.movnt
            .map_or("none".to_string(), |k| format!("{k:?}").to_lowercase())
    );
    println!(
        "  poison:       {} (list: {})",
        sectors_text(info.poisoned_sectors),
        info.badblocks_file.display()
    );
}

pub(crate) fn device_json(info: &DeviceInfo, badblocks: Option<&[BadRange]>) -> serde_json::Value {
    let mut value = json!({
        "dev": info.path,
        "mode": match info.kind { DeviceKind::Emulated => "emulated", DeviceKind::DevDax { .. } => "devdax" },
        "size": info.size,
        "align": info.align,
        "filesystem": info.filesystem,
        "persistence": info.persistence.mode.to_string(),
        "persistence_reason": info.persistence.reason,
        "huge_pages": info.huge_pages.capable,
        "huge_pages_reason": info.huge_pages.reason,
        "flush": info.flush.to_string(),
        "badblocks_file": info.badblocks_file,
    });
    if let Some(badblocks) = badblocks {
        value["badblock_count"] = json!(badblocks.iter().map(|r| r.count).sum::<u64>());
        value["badblocks"] = badblocks
            .iter()
            .map(|r| json!({ "offset": r.sector, "length": r.count }))
            .collect();
    }
    value
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("a JSON value always serialises")
    );
}
