//! The FUSE adapter: every request is one call on the [`Core`] under its
//! lock. Attributes and entries are never cached by the kernel (TTL 0) and
//! files are opened with direct I/O, so after a cut the kernel sees only
//! what the core says.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::core::{Attr, Core, CutOptions, Kind, OpKind, Trip, CONTROL_INO, ROOT};
use crate::CONTROL_NAME;

const TTL: Duration = Duration::ZERO;

#[derive(Debug)]
pub(crate) struct LazyFs {
    core: Arc<Mutex<Core>>,
    uid: u32,
    gid: u32,
    time: SystemTime,
}

impl LazyFs {
    pub(crate) fn new(core: Arc<Mutex<Core>>) -> LazyFs {
        // SAFETY: getuid/getgid cannot fail and have no inputs.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        LazyFs {
            core,
            uid,
            gid,
            time: SystemTime::now(),
        }
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attr(&self, a: Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: match a.kind {
                Kind::File => FileType::RegularFile,
                Kind::Dir => FileType::Directory,
            },
            perm: (a.mode & 0o7777) as u16,
            nlink: if a.kind == Kind::Dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn control_attr(&self) -> FileAttr {
        let size = self
            .core()
            .last_report()
            .map_or(0, |r| r.to_string().len() as u64);
        self.attr(Attr {
            ino: CONTROL_INO,
            kind: Kind::File,
            size,
            mode: 0o600,
        })
    }

    /// Runs a control command; the answer is in the last report.
    fn control(&self, text: &str) -> Result<(), Errno> {
        let mut words = text.split_whitespace();
        match words.next() {
            Some("cut") => {
                let mut opts = CutOptions::forget();
                for w in words {
                    if w == "tear" {
                        opts.tear_last = true;
                    } else if let Some(v) = w.strip_prefix("keep=") {
                        opts.keep_prob = v.parse().map_err(|_| Errno::EINVAL)?;
                    } else if let Some(v) = w.strip_prefix("seed=") {
                        opts.seed = v.parse().map_err(|_| Errno::EINVAL)?;
                    } else {
                        return Err(Errno::EINVAL);
                    }
                }
                self.core().cut(opts).map(|_| ()).map_err(Errno::from)
            }
            Some("arm") => {
                let op = match words.next() {
                    Some("write") => OpKind::Write,
                    Some("setlen") => OpKind::SetLen,
                    Some("create") => OpKind::Create,
                    Some("mkdir") => OpKind::Mkdir,
                    Some("unlink") => OpKind::Unlink,
                    Some("rmdir") => OpKind::Rmdir,
                    Some("rename") => OpKind::Rename,
                    Some("fsync") => OpKind::Fsync,
                    Some("fsyncdir") => OpKind::FsyncDir,
                    _ => return Err(Errno::EINVAL),
                };
                let skip = words
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or(Errno::EINVAL)?;
                let path_contains = words.next().unwrap_or("").to_string();
                self.core().arm(Trip {
                    op,
                    path_contains,
                    skip,
                });
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == CONTROL_NAME {
            return reply.entry(&TTL, &self.control_attr(), Generation(0));
        }
        match self.core().lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &self.attr(a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == CONTROL_INO {
            return reply.attr(&TTL, &self.control_attr());
        }
        match self.core().attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.attr(a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 == CONTROL_INO {
            return reply.attr(&TTL, &self.control_attr());
        }
        let mut core = self.core();
        let res = (|| {
            if let Some(len) = size {
                core.set_len(ino.0, len)?;
            }
            if let Some(m) = mode {
                core.set_mode(ino.0, m)?;
            }
            core.attr(ino.0)
        })();
        drop(core);
        match res {
            Ok(a) => reply.attr(&TTL, &self.attr(a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self
            .core()
            .create(parent.0, name.as_bytes(), Kind::Dir, mode & !umask)
        {
            Ok(a) => reply.entry(&TTL, &self.attr(a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core().remove(parent.0, name.as_bytes(), Kind::File) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core().remove(parent.0, name.as_bytes(), Kind::Dir) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return reply.error(Errno::EINVAL);
        }
        match self.core().rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.contains(RenameFlags::RENAME_NOREPLACE),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != CONTROL_INO {
            if let Err(e) = self.core().attr(ino.0) {
                return reply.error(errno(e));
            }
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .core()
            .create(parent.0, name.as_bytes(), Kind::File, mode & !umask)
        {
            Ok(a) => reply.created(
                &TTL,
                &self.attr(a),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == CONTROL_INO {
            let text = self
                .core()
                .last_report()
                .map(|r| r.to_string())
                .unwrap_or_default();
            let b = text.as_bytes();
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
            let end = start.saturating_add(size as usize).min(b.len());
            return reply.data(&b[start..end]);
        }
        match self.core().read(ino.0, offset, size as usize) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 == CONTROL_INO {
            let text = String::from_utf8_lossy(data);
            return match self.control(&text) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(e),
            };
        }
        match self.core().write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) syncs nothing.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        if ino.0 == CONTROL_INO {
            return reply.ok();
        }
        // fdatasync and fsync alike: data and size become durable.
        match self.core().fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core().attr(ino.0) {
            Ok(a) if a.kind == Kind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(e)),
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
        let entries = match self.core().readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        let dots = [
            (b".".to_vec(), ino.0, Kind::Dir),
            (b"..".to_vec(), ino.0, Kind::Dir),
        ];
        let all = dots.into_iter().chain(entries);
        for (i, (name, child, kind)) in all.enumerate().skip(offset as usize) {
            let ft = match kind {
                Kind::File => FileType::RegularFile,
                Kind::Dir => FileType::Directory,
            };
            if reply.add(INodeNo(child), (i + 1) as u64, ft, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        match self.core().fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTSUP);
    }
}
