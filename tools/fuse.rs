//! The FUSE adapter: kernel requests become calls of the library.
//!
//! It is thin on purpose. Names, inodes, link counts, orphans and atomic
//! open are the filesystem's business ([`daxfs::Fs`]); this layer converts
//! types, keeps the kernel's lookup counts as the filesystem's lookup
//! references (every reply that hands the kernel an inode counts one, every
//! `forget` gives them back), and maps FUSE file handles to library ones.
//! No request can stop the daemon: every error becomes an errno.

use daxfs::{Attr, CreateOptions, FileKind, Fs, Handle, SetAttr, Timestamp};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyStatx, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may trust attributes and names. Only this daemon
/// changes the filesystem, and it tells the kernel when poison changes
/// what a range holds, so a second is safe and saves most lookups.
const TTL: Duration = Duration::from_secs(1);

/// Counts the daemon keeps (for `daxfs stat`).
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Inodes still referenced when the kernel went away.
    pub leaked: AtomicU64,
}

pub struct DaxFuse {
    fs: Arc<Fs>,
    /// File data bypasses the kernel's page cache (DAX semantics) unless
    /// `-o cache` asked for it.
    direct_io: bool,
    /// The kernel checks permissions (`default_permissions`): POSIX ACLs
    /// are on (`FUSE_POSIX_ACL`).
    kernel_checks: bool,
    /// Idmapped mounts are allowed (`FUSE_ALLOW_IDMAP`, which needs
    /// `kernel_checks`).
    idmap: bool,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    pub counters: Arc<Counters>,
}

impl DaxFuse {
    /// `kernel_checks`: the mount has `default_permissions`, so the
    /// kernel enforces permissions and POSIX ACLs, and may idmap the mount.
    pub fn new(fs: Arc<Fs>, direct_io: bool, kernel_checks: bool) -> DaxFuse {
        DaxFuse {
            fs,
            direct_io,
            kernel_checks,
            idmap: false,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            counters: Arc::default(),
        }
    }

    /// Allow idmapped mounts where the kernel checks permissions. Then
    /// most requests name no caller (see `Caller`): not for a session
    /// that filters requests by their caller's uid.
    pub fn with_idmap(mut self) -> DaxFuse {
        self.idmap = self.kernel_checks;
        self
    }

    /// The umask that applies to a file made in `parent`: none when the
    /// directory has a default ACL (the ACL decides then, as Linux's
    /// `posix_acl_create`).
    fn umask(&self, parent: INodeNo, umask: u32) -> u32 {
        match self.kernel_checks && self.fs.has_default_acl(parent.0).unwrap_or(false) {
            true => 0,
            false => umask,
        }
    }

    fn count(&self) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn errno(&self, e: daxfs::Error) -> Errno {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        Errno::from_i32(e.errno())
    }

    fn add_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, handle);
        FileHandle(fh)
    }

    fn take_handle(&self, fh: FileHandle) -> Option<Handle> {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0)
    }

    /// Close the library handle behind `fh` (release, releasedir).
    fn close(&self, fh: FileHandle, reply: ReplyEmpty) {
        match self.take_handle(fh) {
            Some(handle) => self.empty(self.fs.close(handle), reply),
            None => reply.error(Errno::EBADF),
        }
    }

    /// Answer a call that returns nothing.
    fn empty(&self, result: daxfs::Result<()>, reply: ReplyEmpty) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    /// Answer a call that returns attributes.
    fn attr(&self, result: daxfs::Result<Attr>, reply: ReplyAttr) {
        match result {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn open_flags(&self) -> FopenFlags {
        if self.direct_io {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }

    /// Answer a call that made `name` in `parent` (mknod, mkdir, symlink,
    /// link) with its entry, counting the kernel's lookup.
    /// Whether `ino` may be opened with `flags`: for writing, not when it
    /// is immutable, and only with O_APPEND when it is append-only.
    fn may_open(&self, ino: u64, flags: i32) -> daxfs::Result<()> {
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Ok(());
        }
        self.fs.may_open_for_write(ino, flags & libc::O_APPEND != 0)
    }

    /// Answer a create or an O_TMPFILE open: the kernel counts the reply
    /// as a lookup. The handle holds the inode, so counting it cannot race
    /// an unlink.
    fn created(&self, opened: daxfs::Result<(Attr, Handle)>, reply: ReplyCreate) {
        let (attr, handle) = match opened {
            Ok(opened) => opened,
            Err(e) => return reply.error(self.errno(e)),
        };
        if let Err(e) = self.fs.remember(attr.ino) {
            let _ = self.fs.close(handle);
            return reply.error(self.errno(e));
        }
        let fh = self.add_handle(handle);
        let flags = self.open_flags();
        reply.created(&TTL, &file_attr(&attr), generation(&attr), fh, flags);
    }

    fn made<T>(&self, result: daxfs::Result<T>, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match result.and_then(|_| self.fs.lookup_ref(parent.0, name.as_bytes())) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), generation(&attr)),
            Err(e) => reply.error(self.errno(e)),
        }
    }
}

fn time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

fn timestamp(t: TimeOrNow) -> Timestamp {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (secs, nanos) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timestamp { secs, nanos }
        }
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks * 8,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: a.btime.map_or(UNIX_EPOCH, time),
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: fuse_dev(a.rdev),
        blksize: 4096,
        flags: 0,
    }
}

/// The generation the kernel puts in file handles of this inode.
fn generation(a: &Attr) -> Generation {
    Generation(a.generation as u64)
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

/// A device number as the FUSE protocol carries it (the kernel's
/// `new_encode_dev`: 12 bits of major, 20 of minor) from the `dev_t` that
/// daxfs stores (glibc's encoding, as `stat` reports it).
fn fuse_dev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The `dev_t` that a FUSE request's device number stands for.
fn stored_dev(rdev: u32) -> u64 {
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

impl fuser::Filesystem for DaxFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // mmap of direct-I/O files (Linux 6.6 and later; older kernels
        // refuse mmap of them, which -o cache avoids).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        // readdirplus when the kernel sees it pays (a lookup follows a listing).
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        // File handles (name_to_handle_at, NFS export): lookups of "." and
        // ".." by number; inode numbers and generations are stable.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_EXPORT_SUPPORT);
        // POSIX ACLs, enforced by the kernel; the umask is ours to apply
        // (not with a default ACL).
        if self.kernel_checks {
            let _ = config.add_capabilities(
                fuser::InitFlags::FUSE_POSIX_ACL | fuser::InitFlags::FUSE_DONT_MASK,
            );
        }
        // Idmapped mounts (Linux 6.12 and later, with the kernel checking
        // permissions): requests that make an inode carry the caller's ids
        // mapped through the mount's idmap, every other request
        // FUSE_INVALID_UIDGID (see `Caller`).
        if self.idmap {
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_ALLOW_IDMAP);
        }
        // chattr and lsattr on directories too.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_HAS_IOCTL_DIR);
        Ok(())
    }

    fn destroy(&mut self) {
        // The kernel is gone and with it every lookup it remembered.
        match self.fs.forget_all_lookups() {
            Ok(0) => {}
            Ok(left) => {
                self.counters.leaked.store(left, Ordering::Relaxed);
                eprintln!(
                    "daxfs: {left} inodes still referenced after the kernel released the mount"
                );
            }
            Err(e) => eprintln!("daxfs: releasing the kernel's lookups: {e}"),
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.count();
        // "." of any inode resolves a file handle (FUSE_EXPORT_SUPPORT):
        // the inode by its number, ESTALE when it is gone.
        if name.as_bytes() == b"." {
            return match self.fs.lookup_ref_ino(parent.0) {
                Ok(attr) => reply.entry(&TTL, &file_attr(&attr), generation(&attr)),
                Err(daxfs::Error::NotFound) => reply.error(Errno::ESTALE),
                Err(e) => reply.error(self.errno(e)),
            };
        }
        match self.fs.lookup_ref(parent.0, name.as_bytes()) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), generation(&attr)),
            // A negative entry (inode 0) the kernel may cache: every change
            // comes through it, so it learns when the name appears.
            Err(daxfs::Error::NotFound) => {
                let none = FileAttr {
                    ino: INodeNo(0),
                    size: 0,
                    blocks: 0,
                    atime: UNIX_EPOCH,
                    mtime: UNIX_EPOCH,
                    ctime: UNIX_EPOCH,
                    crtime: UNIX_EPOCH,
                    kind: FileType::RegularFile,
                    perm: 0,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 4096,
                    flags: 0,
                };
                reply.entry(&TTL, &none, Generation(0));
            }
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.count();
        if let Err(e) = self.fs.forget(ino.0, nlookup) {
            eprintln!("daxfs: forget({}, {nlookup}): {e}", ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.count();
        self.attr(self.fs.getattr(ino.0), reply)
    }

    /// statx(2) asking for the birth time (the kernel answers the basic
    /// fields from `getattr`): as `getattr`, with the time the inode was
    /// made (none for inodes from before it was kept).
    fn statx(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        _flags: u32,
        _mask: u32,
        reply: ReplyStatx,
    ) {
        self.count();
        match self.fs.getattr(ino.0) {
            Ok(attr) => reply.statx(&TTL, &file_attr(&attr), attr.btime.map(time)),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.count();
        // Times given (not "now") are an attribute change that an
        // append-only file refuses, as Linux's notify_change does.
        let given = |t: &Option<TimeOrNow>| matches!(t, Some(TimeOrNow::SpecificTime(_)));
        if given(&atime) || given(&mtime) {
            match self.fs.getattr(ino.0) {
                Ok(a) if a.flags & FS_APPEND_FL != 0 => return reply.error(Errno::EPERM),
                Ok(_) => {}
                Err(e) => return reply.error(self.errno(e)),
            }
        }
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(timestamp),
            mtime: mtime.map(timestamp),
        };
        self.attr(self.fs.setattr(ino.0, &set), reply)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.count();
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.count();
        let mode = mode & (libc::S_IFMT | (0o7777 & !self.umask(parent, umask)));
        self.made(
            self.fs.mknod(
                parent.0,
                name.as_bytes(),
                mode,
                stored_dev(rdev),
                req.uid(),
                req.gid(),
            ),
            parent,
            name,
            reply,
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.count();
        let mode = mode & !self.umask(parent, umask) & 0o7777;
        self.made(
            self.fs
                .mkdir(parent.0, name.as_bytes(), mode, req.uid(), req.gid()),
            parent,
            name,
            reply,
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count();
        self.empty(self.fs.unlink(parent.0, name.as_bytes()), reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count();
        self.empty(self.fs.rmdir(parent.0, name.as_bytes()), reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.count();
        let target = target.as_os_str().as_bytes();
        self.made(
            self.fs
                .symlink(parent.0, link_name.as_bytes(), target, req.uid(), req.gid()),
            parent,
            link_name,
            reply,
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.count();
        let flags = daxfs::RenameFlags {
            noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
            whiteout: flags.contains(fuser::RenameFlags::RENAME_WHITEOUT),
        };
        self.empty(
            self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags,
            ),
            reply,
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.count();
        self.made(
            self.fs.link(ino.0, newparent.0, newname.as_bytes()),
            newparent,
            newname,
            reply,
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.count();
        match self
            .may_open(ino.0, flags.0)
            .and_then(|()| self.fs.open(ino.0))
        {
            Ok(handle) => reply.opened(self.add_handle(handle), self.open_flags()),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.count();
        let opts = CreateOptions {
            exclusive: flags & libc::O_EXCL != 0,
            truncate: flags & libc::O_TRUNC != 0,
            mode: mode & !self.umask(parent, umask) & 0o7777,
            uid: req.uid(),
            gid: req.gid(),
        };
        let opened = self.fs.open_create(parent.0, name.as_bytes(), &opts);
        let opened = opened.and_then(|(attr, handle, created)| {
            // (An existing file: opened as open(2) would.)
            match created || flags & libc::O_ACCMODE == libc::O_RDONLY {
                true => Ok((attr, handle)),
                false => match self.may_open(attr.ino, flags) {
                    Ok(()) => Ok((attr, handle)),
                    Err(e) => {
                        let _ = self.fs.close(handle);
                        Err(e)
                    }
                },
            }
        });
        self.created(opened, reply)
    }

    /// open(O_TMPFILE): an unnamed file in `parent`, open; linkat names it
    /// unless it was opened with O_EXCL.
    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.count();
        let mode = mode & !self.umask(parent, umask) & 0o7777;
        let linkable = flags & libc::O_EXCL == 0;
        let made = self
            .fs
            .tmpfile(parent.0, mode, req.uid(), req.gid(), linkable);
        self.created(made, reply)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.count();
        let mut buf = vec![0u8; size as usize];
        match self.fs.read(ino.0, offset, &mut buf) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        self.count();
        // A write by a process without CAP_FSETID drops set-user-ID, and
        // set-group-ID unless it is a locking mark kept for a member of
        // the group, as Linux's file_remove_privs does: the kernel does it
        // for cached writes, and for direct I/O ones (which come here)
        // says so with FUSE_WRITE_KILL_SUIDGID.
        if write_flags.contains(fuser::WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            let caller = Caller::of(req);
            if let Err(e) = self.fs.drop_setid(ino.0, |gid| caller.in_group(gid)) {
                return reply.error(self.errno(e));
            }
        }
        match self.fs.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        self.count();
        // Nothing to flush (every write is durable when it returns): ENOSYS
        // tells the kernel to stop sending FLUSH at every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.count();
        self.close(fh, reply);
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        self.count();
        self.empty(self.fs.fsync(ino.0), reply)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.count();
        match self.fs.getattr(ino.0) {
            Ok(attr) if attr.kind != FileKind::Dir => reply.error(Errno::ENOTDIR),
            Ok(_) => match self.fs.open(ino.0) {
                Ok(handle) => reply.opened(self.add_handle(handle), FopenFlags::empty()),
                Err(e) => reply.error(self.errno(e)),
            },
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.count();
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                for e in entries {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), e.next, file_type(e.kind), name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        self.count();
        let entries = match self.fs.readdir(ino.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(self.errno(e)),
        };
        for e in entries {
            let name = OsStr::from_bytes(&e.name);
            // Every entry but . and .. hands the kernel an inode: count it,
            // and give it back if the entry does not fit.
            let dots = e.name == b"." || e.name == b"..";
            let attr = if dots {
                self.fs.getattr(e.ino)
            } else {
                self.fs.lookup_ref(ino.0, &e.name)
            };
            let Ok(attr) = attr else {
                continue; // gone since the listing: skip it
            };
            if reply.add(
                INodeNo(attr.ino),
                e.next,
                name,
                &TTL,
                &file_attr(&attr),
                generation(&attr),
            ) {
                if !dots {
                    let _ = self.fs.forget(attr.ino, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.count();
        self.close(fh, reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _d: bool,
        reply: ReplyEmpty,
    ) {
        self.count();
        // Every change is durable when it returns.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.count();
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks,
            s.free_blocks,
            s.available_blocks,
            s.files,
            s.free_files,
            s.block_size as u32,
            s.name_max as u32,
            s.block_size as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.count();
        let create = flags & libc::XATTR_CREATE != 0;
        let replace = flags & libc::XATTR_REPLACE != 0;
        self.empty(
            self.fs
                .setxattr(ino.0, name.as_bytes(), value, create, replace),
            reply,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.count();
        match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(value) => sized(reply, &value, size),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.count();
        match self.fs.listxattr(ino.0) {
            Ok(names) => {
                let mut list = Vec::new();
                // trusted.* is listed to root only, as ext4 and tmpfs do
                // (for the rest, the kernel refuses it before we see it).
                let trusted = |name: &Vec<u8>| name.starts_with(b"trusted.");
                let root = names.iter().any(trusted) && Caller::of(req).is_root();
                for name in names.into_iter().filter(|name| root || !trusted(name)) {
                    list.extend_from_slice(&name);
                    list.push(0);
                }
                sized(reply, &list, size);
            }
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count();
        self.empty(self.fs.removexattr(ino.0, name.as_bytes()), reply)
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.count();
        // Permission bits are checked by the kernel (default_permissions).
        match self.fs.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        self.count();
        // Below 0 is no offset in the file: ENXIO, as Linux's
        // iomap_seek_data/iomap_seek_hole (ext4, XFS) and tmpfs say.
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        let what = match whence {
            libc::SEEK_DATA => daxfs::Seek::Data,
            libc::SEEK_HOLE => daxfs::Seek::Hole,
            // The kernel handles SEEK_SET, SEEK_CUR and SEEK_END itself.
            _ => return reply.error(Errno::EINVAL),
        };
        match self.fs.seek(ino.0, offset, what) {
            Ok(Some(at)) => reply.offset(at as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(self.errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.count();
        // In the daemon, without a trip through the kernel per chunk.
        let len = len.min(u32::MAX as u64 & !0xfff);
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut copied = 0u64;
        while copied < len {
            let want = (len - copied).min(buf.len() as u64) as usize;
            let n = match self.fs.read(ino_in.0, offset_in + copied, &mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if copied == 0 => return reply.error(self.errno(e)),
                Err(_) => break,
            };
            match self.fs.write(ino_out.0, offset_out + copied, &buf[..n]) {
                Ok(_) => copied += n as u64,
                Err(e) if copied == 0 => return reply.error(self.errno(e)),
                Err(_) => break,
            }
        }
        reply.written(copied as u32);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.count();
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let result = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => self.fs.fallocate(ino.0, offset, length, keep_size),
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => self.fs.punch_hole(ino.0, offset, length),
            libc::FALLOC_FL_PUNCH_HOLE => Err(daxfs::Error::Invalid("PUNCH_HOLE needs KEEP_SIZE")),
            _ => Err(daxfs::Error::Unsupported("this fallocate mode")),
        };
        self.empty(result, reply)
    }

    /// The attribute-flag ioctls that `chattr` and `lsattr` (and xfs_io)
    /// make: the kernel turns each into one of these four.
    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.count();
        match self.attr_ioctl(req, ino.0, cmd, in_data) {
            Ok(mut out) => {
                out.truncate(out_size as usize);
                reply.ioctl(0, &out)
            }
            Err(e) => reply.error(e),
        }
    }
}

/// `FS_IOC_GETFLAGS` and `FS_IOC_SETFLAGS` (an `int` passed through a
/// `long` pointer), their 32-bit forms, and XFS's `FS_IOC_FSGETXATTR` and
/// `FS_IOC_FSSETXATTR` (a 28-byte `struct fsxattr`).
const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
const FS_IOC32_GETFLAGS: u32 = 0x8004_6601;
const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
const FSXATTR_SIZE: usize = 28;
use daxfs::format::{FLAG_APPEND as FS_APPEND_FL, FLAG_IMMUTABLE as FS_IMMUTABLE_FL};

impl DaxFuse {
    /// Serve an attribute-flag ioctl; what goes back, or the errno.
    fn attr_ioctl(
        &self,
        req: &Request,
        ino: u64,
        cmd: u32,
        in_data: &[u8],
    ) -> Result<Vec<u8>, Errno> {
        let fail = |e| self.errno(e);
        let word = |at: usize| {
            in_data
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .ok_or(Errno::EINVAL)
        };
        let attr = self.fs.getattr(ino).map_err(fail)?;
        let set = |flags: u32| {
            // The kernel checks the owner and CAP_LINUX_IMMUTABLE before
            // sending this (vfs_fileattr_set); checked again where the
            // request names its caller (an idmapped mount's ids are the
            // kernel's to compare).
            let privileged = (attr.flags ^ flags) & (FS_IMMUTABLE_FL | FS_APPEND_FL) != 0;
            let uid = req.uid();
            if uid != FUSE_INVALID_UIDGID && uid != 0 && (uid != attr.uid || privileged) {
                return Err(Errno::EPERM);
            }
            self.fs.set_flags(ino, flags).map(drop).map_err(fail)
        };
        match cmd {
            FS_IOC_GETFLAGS | FS_IOC32_GETFLAGS => Ok(attr.flags.to_le_bytes().to_vec()),
            FS_IOC_SETFLAGS | FS_IOC32_SETFLAGS => set(word(0)?).map(|()| Vec::new()),
            FS_IOC_FSGETXATTR => {
                let mut out = vec![0u8; FSXATTR_SIZE];
                out[..4].copy_from_slice(&daxfs::to_xflags(attr.flags).to_le_bytes());
                Ok(out)
            }
            FS_IOC_FSSETXATTR => {
                // Extent size hints and project ids are not kept: only 0.
                if word(4)? != 0 || word(12)? != 0 || word(16)? != 0 {
                    return Err(Errno::from_i32(libc::EOPNOTSUPP));
                }
                let flags =
                    daxfs::from_xflags(word(0)?).ok_or(Errno::from_i32(libc::EOPNOTSUPP))?;
                set(flags).map(|()| Vec::new())
            }
            _ => Err(Errno::from_i32(libc::ENOTTY)),
        }
    }
}

/// An xattr reply: the size when asked for it (`size` 0), `ERANGE` when the
/// caller's buffer is too small, the bytes otherwise.
fn sized(reply: ReplyXattr, bytes: &[u8], size: u32) {
    if size == 0 {
        reply.size(bytes.len() as u32);
    } else if bytes.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(bytes);
    }
}

/// What a request's header holds for its caller's ids where the mount
/// takes idmapped mounts and the request makes no inode.
const FUSE_INVALID_UIDGID: u32 = u32::MAX;

/// Who made a request, for the few decisions the kernel leaves to us.
/// The header names the caller's filesystem uid and gid, except where the
/// mount takes idmapped mounts (`FUSE_ALLOW_IDMAP`): there only requests
/// that make an inode carry ids (mapped through the mount's idmap), the
/// rest `FUSE_INVALID_UIDGID`, and the ids are read from
/// `/proc/PID/status` (the process's own, not mapped). Supplementary
/// groups always come from there: FUSE does not pass them.
struct Caller {
    uid: Option<u32>,
    gid: Option<u32>,
    pid: u32,
}

impl Caller {
    fn of(req: &Request) -> Caller {
        let known = |id: u32| (id != FUSE_INVALID_UIDGID).then_some(id);
        Caller {
            uid: known(req.uid()),
            gid: known(req.gid()),
            pid: req.pid(),
        }
    }

    /// The caller's `/proc/PID/status` (empty if the process is gone).
    fn status(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default()
    }

    fn is_root(&self) -> bool {
        match self.uid {
            Some(uid) => uid == 0,
            None => ids(&self.status(), "Uid:").get(3) == Some(&0),
        }
    }

    /// Whether `gid` is the caller's filesystem group or one of its
    /// supplementary groups (none known if the process is gone).
    fn in_group(&self, gid: u32) -> bool {
        if self.gid == Some(gid) {
            return true;
        }
        let status = self.status();
        (self.gid.is_none() && ids(&status, "Gid:").get(3) == Some(&gid))
            || ids(&status, "Groups:").contains(&gid)
    }
}

/// The ids on line `key` of a `/proc/PID/status` (for `Uid:` and `Gid:`
/// the filesystem id is the fourth).
fn ids(status: &str, key: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .map(|ids| {
            ids.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
