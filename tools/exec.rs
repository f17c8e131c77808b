//! `daxfs exec`: run a program with the preload library, so that its
//! mappings of files on daxfs mounts are mappings of the device's pages.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Map directly only files of this mount (repeatable; default: every
    /// daxfs mount the program's user owns, or every one for root).
    #[arg(long = "mount", value_name = "MNT")]
    mounts: Vec<PathBuf>,
    /// Say on stderr why a mapping was left to the kernel
    /// (DAXFS_PRELOAD_DEBUG=1).
    #[arg(long)]
    debug: bool,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// The preload library: `$DAXFS_PRELOAD`, or beside this program (where
/// cargo builds both).
pub fn library() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DAXFS_PRELOAD") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let beside = me.with_file_name("libdaxfs_preload.so");
    match beside.exists() {
        true => Ok(beside),
        false => Err(format!(
            "the preload library is not at {} (build it with `cargo build --release -p \
             daxfs-preload`, or name it in DAXFS_PRELOAD)",
            beside.display()
        )),
    }
}

pub fn exec(args: ExecArgs) -> Result<(), String> {
    let library = library()?;
    for mount in &args.mounts {
        if daxfs_client::mounts::image_of(mount).is_none() {
            return Err(format!("{}: not a daxfs mount", mount.display()));
        }
    }
    let mut preload = OsString::from(library.as_os_str());
    if let Some(others) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        preload.push(" ");
        preload.push(others);
    }
    let (program, rest) = args.command.split_first().expect("clap requires one");
    let mut command = std::process::Command::new(program);
    command.args(rest).env("LD_PRELOAD", preload);
    if !args.mounts.is_empty() {
        let joined = std::env::join_paths(args.mounts.iter().map(|m| absolute(m)))
            .map_err(|e| format!("--mount: {e}"))?;
        command.env("DAXFS_PRELOAD_MOUNTS", joined);
    }
    if args.debug {
        command.env("DAXFS_PRELOAD_DEBUG", "1");
    }
    let e = command.exec();
    Err(format!("{}: {e}", Path::new(program).display()))
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
