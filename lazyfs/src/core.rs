//! The state machine behind the filesystem, usable without FUSE.
//!
//! Two views of one tree of objects (files and directories, by inode):
//!
//! * the **volatile** view is what processes see: every write, truncation,
//!   create, rename and unlink lands there at once (the page cache and the
//!   in-memory dentries of a real kernel);
//! * the **durable** view is what a power cut would leave: a file's data
//!   and size reach it when *that file* is fsynced (or fdatasynced), a
//!   directory's entries when *that directory* is fsynced.
//!
//! The backing directory always mirrors the durable view (a second mount
//! over it starts from exactly what survived). [`Core::cut`] replaces the
//! volatile view by the durable one, optionally keeping some unsynced
//! operations or a torn prefix of each file's last unsynced write, and
//! reports what it dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Inode number.
pub type Ino = u64;
/// The root directory's inode.
pub const ROOT: Ino = 1;
/// Inode reserved for the control file (see [`crate::CONTROL_NAME`]).
pub const CONTROL_INO: Ino = 2;
/// A directory entry name (raw bytes).
pub type Name = Vec<u8>;
/// An errno value.
pub type Errno = i32;

/// Bound on the depth of the tree walks (no loops are possible, but a
/// broken invariant must not hang a test).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// An unsynced change to a file's data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DataOp {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
}

impl DataOp {
    fn apply(&self, buf: &mut Vec<u8>) {
        match self {
            DataOp::Write { off, data } => write_into(buf, *off, data),
            DataOp::SetLen(len) => buf.resize(to_usize(*len), 0),
        }
    }
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn write_into(buf: &mut Vec<u8>, off: u64, data: &[u8]) {
    let off = to_usize(off);
    let end = off + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[off..end].copy_from_slice(data);
}

#[derive(Debug)]
struct Obj {
    kind: Kind,
    mode: u32,
    /// Files: the volatile content.
    data: Vec<u8>,
    /// Files: the durable content.
    durable: Vec<u8>,
    /// Files: the changes since the last fsync, in order.
    log: Vec<DataOp>,
    /// Directories: the volatile entries.
    entries: BTreeMap<Name, Ino>,
    /// Directories: the durable entries.
    dentries: BTreeMap<Name, Ino>,
    /// The volatile name, for paths in reports and trips.
    parent: Option<(Ino, Name)>,
}

impl Obj {
    fn new(kind: Kind, mode: u32, parent: Option<(Ino, Name)>) -> Obj {
        Obj {
            kind,
            mode,
            data: Vec::new(),
            durable: Vec::new(),
            log: Vec::new(),
            entries: BTreeMap::new(),
            dentries: BTreeMap::new(),
            parent,
        }
    }
}

/// A pending namespace operation: one create, unlink or rename (a rename
/// changes two entries at once).
#[derive(Debug, Clone)]
struct NsOp {
    changes: Vec<(Ino, Name, Option<Ino>)>,
    what: String,
}

/// The operations a [`Trip`] can fire on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Write,
    SetLen,
    Create,
    Mkdir,
    Unlink,
    Rmdir,
    Rename,
    Fsync,
    FsyncDir,
}

/// Fires on the `skip + 1`-th operation of kind `op` whose path contains
/// `path_contains` (a rename's path is `"FROM -> TO"`; a pattern ending in
/// `$` must end the path instead): that operation and
/// every later modifying one fail with EIO, as if the machine had died just
/// before it, until the next [`Core::cut`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    pub op: OpKind,
    pub path_contains: String,
    pub skip: u32,
}

/// How a cut treats what was not synced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CutOptions {
    /// Seeds the choices below.
    pub seed: u64,
    /// Each unsynced write, truncation and namespace operation survives
    /// whole with this probability (0: a strict forget).
    pub keep_prob: f64,
    /// Keep a random prefix (possibly empty, possibly whole) of each file's
    /// last unsynced write.
    pub tear_last: bool,
}

impl CutOptions {
    /// Forget everything unsynced.
    pub fn forget() -> CutOptions {
        CutOptions {
            seed: 0,
            keep_prob: 0.0,
            tear_last: false,
        }
    }
}

/// What a cut did to one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileCut {
    pub path: String,
    /// Unsynced writes and truncations dropped.
    pub dropped_ops: usize,
    pub dropped_bytes: u64,
    /// Unsynced writes and truncations that survived whole.
    pub kept_ops: usize,
    /// The last write, torn: (offset, bytes kept, length).
    pub torn: Option<(u64, usize, usize)>,
}

/// What a cut dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    pub files: Vec<FileCut>,
    /// Namespace operations dropped.
    pub dropped_ns: Vec<String>,
    /// Namespace operations that survived without their directory's fsync.
    pub kept_ns: Vec<String>,
    /// The trip that had fired, if any.
    pub tripped: Option<String>,
}

impl CutReport {
    /// Whether the cut lost anything at all.
    pub fn dropped_anything(&self) -> bool {
        !self.dropped_ns.is_empty()
            || self
                .files
                .iter()
                .any(|f| f.dropped_ops > 0 || f.torn.is_some_and(|(_, k, n)| k < n))
    }
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = &self.tripped {
            writeln!(f, "tripped before: {t}")?;
        }
        for c in &self.files {
            write!(
                f,
                "file {}: dropped {} ops ({} bytes), kept {}",
                c.path, c.dropped_ops, c.dropped_bytes, c.kept_ops
            )?;
            if let Some((off, kept, len)) = c.torn {
                write!(f, ", tore write at {off}: kept {kept} of {len} bytes")?;
            }
            writeln!(f)?;
        }
        for n in &self.dropped_ns {
            writeln!(f, "dropped {n}")?;
        }
        for n in &self.kept_ns {
            writeln!(f, "kept unsynced {n}")?;
        }
        Ok(())
    }
}

/// Operation counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub writes: u64,
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub ns_ops: u64,
    pub cuts: u64,
}

/// Attributes the FUSE layer reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
}

/// The filesystem's state (see the module docs).
#[derive(Debug)]
pub struct Core {
    objs: HashMap<Ino, Obj>,
    next: Ino,
    pending: Vec<NsOp>,
    backing: PathBuf,
    /// What the backing directory holds: relative path -> object.
    materialized: BTreeMap<PathBuf, Ino>,
    trip: Option<Trip>,
    tripped: Option<String>,
    stats: Stats,
    last_report: Option<CutReport>,
}

fn eio(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Core {
    /// Loads the durable state from `backing` (created if missing). Only
    /// regular files and directories are supported; anything else is an
    /// error.
    pub fn load(backing: &Path) -> io::Result<Core> {
        fs::create_dir_all(backing)?;
        let mut core = Core {
            objs: HashMap::new(),
            next: CONTROL_INO + 1,
            pending: Vec::new(),
            backing: backing.to_path_buf(),
            materialized: BTreeMap::new(),
            trip: None,
            tripped: None,
            stats: Stats::default(),
            last_report: None,
        };
        let mode = fs::metadata(backing)?.permissions().mode() & 0o7777;
        core.objs.insert(ROOT, Obj::new(Kind::Dir, mode, None));
        core.materialized.insert(PathBuf::new(), ROOT);
        core.load_dir(ROOT, PathBuf::new(), 0)?;
        Ok(core)
    }

    fn load_dir(&mut self, dir: Ino, rel: PathBuf, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(io::Error::other("backing directory too deep"));
        }
        let mut names: Vec<_> = fs::read_dir(self.backing.join(&rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let path = rel.join(&name);
            let full = self.backing.join(&path);
            let meta = fs::symlink_metadata(&full)?;
            let mode = meta.permissions().mode() & 0o7777;
            let name = name.into_vec();
            let ino = self.next;
            self.next += 1;
            let mut obj;
            if meta.is_dir() {
                obj = Obj::new(Kind::Dir, mode, Some((dir, name.clone())));
                self.objs.insert(ino, obj);
                self.load_dir(ino, path.clone(), depth + 1)?;
            } else if meta.is_file() {
                obj = Obj::new(Kind::File, mode, Some((dir, name.clone())));
                obj.data = fs::read(&full)?;
                obj.durable = obj.data.clone();
                self.objs.insert(ino, obj);
            } else {
                return Err(io::Error::other(format!(
                    "{}: only files and directories are supported",
                    full.display()
                )));
            }
            self.materialized.insert(path, ino);
            let d = self.dir_mut(dir).map_err(io::Error::from_raw_os_error)?;
            d.entries.insert(name.clone(), ino);
            d.dentries.insert(name, ino);
        }
        Ok(())
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn last_report(&self) -> Option<&CutReport> {
        self.last_report.as_ref()
    }

    fn obj(&self, ino: Ino) -> Result<&Obj, Errno> {
        self.objs.get(&ino).ok_or(libc::ENOENT)
    }

    fn obj_mut(&mut self, ino: Ino) -> Result<&mut Obj, Errno> {
        self.objs.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir_mut(&mut self, ino: Ino) -> Result<&mut Obj, Errno> {
        let o = self.obj_mut(ino)?;
        if o.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(o)
    }

    fn file_mut(&mut self, ino: Ino) -> Result<&mut Obj, Errno> {
        let o = self.obj_mut(ino)?;
        if o.kind != Kind::File {
            return Err(libc::EISDIR);
        }
        Ok(o)
    }

    /// The volatile path of `ino` ("/" for the root).
    pub fn path(&self, ino: Ino) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut cur = ino;
        for _ in 0..MAX_DEPTH {
            match self.objs.get(&cur).and_then(|o| o.parent.as_ref()) {
                Some((p, name)) => {
                    parts.push(String::from_utf8_lossy(name).into_owned());
                    cur = *p;
                }
                None => break,
            }
        }
        if cur != ROOT {
            parts.push("(unlinked)".into());
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn child_path(&self, dir: Ino, name: &[u8]) -> String {
        let p = self.path(dir);
        let sep = if p.ends_with('/') { "" } else { "/" };
        format!("{p}{sep}{}", String::from_utf8_lossy(name))
    }

    /// Arms a trip (replacing any armed one).
    pub fn arm(&mut self, trip: Trip) {
        self.trip = Some(trip);
    }

    /// What the trip fired on, if it has.
    pub fn tripped(&self) -> Option<&str> {
        self.tripped.as_deref()
    }

    /// Every modifying operation passes here first.
    fn check(&mut self, op: OpKind, path: &str) -> Result<(), Errno> {
        if self.tripped.is_some() {
            return Err(libc::EIO);
        }
        if let Some(t) = &mut self.trip {
            let hit = match t.path_contains.strip_suffix('$') {
                Some(end) => path.ends_with(end),
                None => path.contains(&t.path_contains),
            };
            if t.op == op && hit {
                if t.skip == 0 {
                    self.tripped = Some(format!("{op:?} {path}"));
                    self.trip = None;
                    return Err(libc::EIO);
                }
                t.skip -= 1;
            }
        }
        Ok(())
    }

    // ---- the volatile view -------------------------------------------

    pub fn attr(&self, ino: Ino) -> Result<Attr, Errno> {
        let o = self.obj(ino)?;
        Ok(Attr {
            ino,
            kind: o.kind,
            size: o.data.len() as u64,
            mode: o.mode,
        })
    }

    pub fn lookup(&self, dir: Ino, name: &[u8]) -> Result<Attr, Errno> {
        let d = self.obj(dir)?;
        if d.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let ino = *d.entries.get(name).ok_or(libc::ENOENT)?;
        self.attr(ino)
    }

    /// The volatile entries of a directory, sorted by name.
    pub fn readdir(&self, dir: Ino) -> Result<Vec<(Name, Ino, Kind)>, Errno> {
        let d = self.obj(dir)?;
        if d.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(d.entries
            .iter()
            .filter_map(|(n, i)| self.objs.get(i).map(|o| (n.clone(), *i, o.kind)))
            .collect())
    }

    /// Creates a file or directory (pending until `dir` is fsynced).
    pub fn create(&mut self, dir: Ino, name: &[u8], kind: Kind, mode: u32) -> Result<Attr, Errno> {
        if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            return Err(libc::EINVAL);
        }
        let path = self.child_path(dir, name);
        let op = if kind == Kind::Dir {
            OpKind::Mkdir
        } else {
            OpKind::Create
        };
        {
            let d = self.dir_mut(dir)?;
            if d.entries.contains_key(name) {
                return Err(libc::EEXIST);
            }
        }
        self.check(op, &path)?;
        let ino = self.next;
        self.next += 1;
        self.objs.insert(
            ino,
            Obj::new(kind, mode & 0o7777, Some((dir, name.to_vec()))),
        );
        self.dir_mut(dir)?.entries.insert(name.to_vec(), ino);
        self.pending.push(NsOp {
            changes: vec![(dir, name.to_vec(), Some(ino))],
            what: format!("{} {path}", format!("{op:?}").to_lowercase()),
        });
        self.stats.ns_ops += 1;
        self.attr(ino)
    }

    /// Removes a file (`kind` File) or an empty directory (`kind` Dir).
    pub fn remove(&mut self, dir: Ino, name: &[u8], kind: Kind) -> Result<(), Errno> {
        let path = self.child_path(dir, name);
        let ino = *self.obj(dir)?.entries.get(name).ok_or(libc::ENOENT)?;
        let o = self.obj(ino)?;
        match (kind, o.kind) {
            (Kind::File, Kind::Dir) => return Err(libc::EISDIR),
            (Kind::Dir, Kind::File) => return Err(libc::ENOTDIR),
            (Kind::Dir, Kind::Dir) if !o.entries.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        let op = if kind == Kind::Dir {
            OpKind::Rmdir
        } else {
            OpKind::Unlink
        };
        self.check(op, &path)?;
        self.dir_mut(dir)?.entries.remove(name);
        self.obj_mut(ino)?.parent = None;
        self.pending.push(NsOp {
            changes: vec![(dir, name.to_vec(), None)],
            what: format!("{} {path}", format!("{op:?}").to_lowercase()),
        });
        self.stats.ns_ops += 1;
        Ok(())
    }

    /// rename(2), with RENAME_NOREPLACE when `noreplace`.
    pub fn rename(
        &mut self,
        dir: Ino,
        name: &[u8],
        newdir: Ino,
        newname: &[u8],
        noreplace: bool,
    ) -> Result<(), Errno> {
        if newname.is_empty() || newname.contains(&b'/') {
            return Err(libc::EINVAL);
        }
        let src = *self.obj(dir)?.entries.get(name).ok_or(libc::ENOENT)?;
        let nd = self.obj(newdir)?;
        if nd.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let dst = nd.entries.get(newname).copied();
        if dst == Some(src) {
            return Ok(());
        }
        let src_kind = self.obj(src)?.kind;
        if let Some(d) = dst {
            if noreplace {
                return Err(libc::EEXIST);
            }
            let dobj = self.obj(d)?;
            match (src_kind, dobj.kind) {
                (Kind::File, Kind::Dir) => return Err(libc::EISDIR),
                (Kind::Dir, Kind::File) => return Err(libc::ENOTDIR),
                (Kind::Dir, Kind::Dir) if !dobj.entries.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        if src_kind == Kind::Dir {
            // Not into its own subtree.
            let mut cur = newdir;
            for _ in 0..MAX_DEPTH {
                if cur == src {
                    return Err(libc::EINVAL);
                }
                match self.objs.get(&cur).and_then(|o| o.parent.as_ref()) {
                    Some((p, _)) => cur = *p,
                    None => break,
                }
            }
        }
        let path = format!(
            "{} -> {}",
            self.child_path(dir, name),
            self.child_path(newdir, newname)
        );
        self.check(OpKind::Rename, &path)?;
        self.dir_mut(dir)?.entries.remove(name);
        self.dir_mut(newdir)?.entries.insert(newname.to_vec(), src);
        if let Some(d) = dst {
            self.obj_mut(d)?.parent = None;
        }
        self.obj_mut(src)?.parent = Some((newdir, newname.to_vec()));
        self.pending.push(NsOp {
            changes: vec![
                (newdir, newname.to_vec(), Some(src)),
                (dir, name.to_vec(), None),
            ],
            what: format!("rename {path}"),
        });
        self.stats.ns_ops += 1;
        Ok(())
    }

    pub fn read(&self, ino: Ino, off: u64, size: usize) -> Result<Vec<u8>, Errno> {
        let o = self.obj(ino)?;
        if o.kind != Kind::File {
            return Err(libc::EISDIR);
        }
        let start = to_usize(off).min(o.data.len());
        let end = start.saturating_add(size).min(o.data.len());
        Ok(o.data[start..end].to_vec())
    }

    pub fn write(&mut self, ino: Ino, off: u64, data: &[u8]) -> Result<usize, Errno> {
        self.file_mut(ino)?;
        if off
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > 1 << 40)
        {
            return Err(libc::EFBIG);
        }
        let path = self.path(ino);
        self.check(OpKind::Write, &path)?;
        let o = self.file_mut(ino)?;
        write_into(&mut o.data, off, data);
        o.log.push(DataOp::Write {
            off,
            data: data.to_vec(),
        });
        self.stats.writes += 1;
        Ok(data.len())
    }

    pub fn set_len(&mut self, ino: Ino, len: u64) -> Result<(), Errno> {
        self.file_mut(ino)?;
        if len > 1 << 40 {
            return Err(libc::EFBIG);
        }
        let path = self.path(ino);
        self.check(OpKind::SetLen, &path)?;
        let o = self.file_mut(ino)?;
        o.data.resize(to_usize(len), 0);
        o.log.push(DataOp::SetLen(len));
        Ok(())
    }

    /// chmod: durable at once (modes are not what this filesystem tests).
    pub fn set_mode(&mut self, ino: Ino, mode: u32) -> Result<(), Errno> {
        let o = self.obj_mut(ino)?;
        o.mode = mode & 0o7777;
        let paths: Vec<PathBuf> = self.backing_paths(ino);
        for p in paths {
            fs::set_permissions(
                self.backing.join(p),
                fs::Permissions::from_mode(mode & 0o7777),
            )
            .map_err(eio)?;
        }
        Ok(())
    }

    // ---- making things durable ----------------------------------------

    /// fsync(2) or fdatasync(2) of a file or directory.
    pub fn fsync(&mut self, ino: Ino) -> Result<(), Errno> {
        let kind = self.obj(ino)?.kind;
        let path = self.path(ino);
        match kind {
            Kind::File => {
                self.check(OpKind::Fsync, &path)?;
                self.stats.fsyncs += 1;
                let o = self.file_mut(ino)?;
                let log = std::mem::take(&mut o.log);
                for op in &log {
                    op.apply(&mut o.durable);
                }
                debug_assert_eq!(o.durable, o.data);
                self.write_backing_ops(ino, &log)
            }
            Kind::Dir => {
                self.check(OpKind::FsyncDir, &path)?;
                self.stats.dir_fsyncs += 1;
                self.sync_dir(ino)
            }
        }
    }

    /// Applies the pending namespace operations that touch `dir`, and the
    /// earlier ones on the same entries (so that entries change in order).
    fn sync_dir(&mut self, dir: Ino) -> Result<(), Errno> {
        let mut needed: BTreeSet<(Ino, Name)> = BTreeSet::new();
        let mut take = vec![false; self.pending.len()];
        for (i, op) in self.pending.iter().enumerate().rev() {
            let hit = op
                .changes
                .iter()
                .any(|(d, n, _)| *d == dir || needed.contains(&(*d, n.clone())));
            if hit {
                take[i] = true;
                for (d, n, _) in &op.changes {
                    needed.insert((*d, n.clone()));
                }
            }
        }
        let pending = std::mem::take(&mut self.pending);
        let mut rest = Vec::new();
        for (op, t) in pending.into_iter().zip(take) {
            if t {
                self.apply_durable(&op);
            } else {
                rest.push(op);
            }
        }
        self.pending = rest;
        self.materialize().map_err(eio)
    }

    fn apply_durable(&mut self, op: &NsOp) {
        for (d, n, target) in &op.changes {
            if let Some(dir) = self.objs.get_mut(d) {
                match target {
                    Some(t) => dir.dentries.insert(n.clone(), *t),
                    None => dir.dentries.remove(n),
                };
            }
        }
    }

    /// The durable tree: relative path -> object, parents before children.
    fn durable_tree(&self) -> BTreeMap<PathBuf, Ino> {
        let mut out = BTreeMap::new();
        out.insert(PathBuf::new(), ROOT);
        let mut stack = vec![(ROOT, PathBuf::new(), 0usize)];
        while let Some((dir, rel, depth)) = stack.pop() {
            let Some(d) = self.objs.get(&dir) else {
                continue;
            };
            for (name, ino) in &d.dentries {
                let p = rel.join(std::ffi::OsStr::from_bytes(name));
                if let Some(o) = self.objs.get(ino) {
                    if out.insert(p.clone(), *ino).is_none()
                        && o.kind == Kind::Dir
                        && depth < MAX_DEPTH
                    {
                        stack.push((*ino, p, depth + 1));
                    }
                }
            }
        }
        out
    }

    fn backing_paths(&self, ino: Ino) -> Vec<PathBuf> {
        self.materialized
            .iter()
            .filter(|(_, i)| **i == ino)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Applies a file's synced operations to its backing copies.
    fn write_backing_ops(&mut self, ino: Ino, ops: &[DataOp]) -> Result<(), Errno> {
        for rel in self.backing_paths(ino) {
            let f = OpenOptions::new()
                .write(true)
                .open(self.backing.join(rel))
                .map_err(eio)?;
            for op in ops {
                match op {
                    DataOp::Write { off, data } => f.write_all_at(data, *off).map_err(eio)?,
                    DataOp::SetLen(len) => f.set_len(*len).map_err(eio)?,
                }
            }
        }
        Ok(())
    }

    /// Makes the backing directory hold exactly the durable tree.
    fn materialize(&mut self) -> io::Result<()> {
        let want = self.durable_tree();
        let stale: Vec<PathBuf> = self
            .materialized
            .iter()
            .rev()
            .filter(|(p, i)| want.get(*p) != Some(i))
            .map(|(p, _)| p.clone())
            .collect();
        for rel in stale {
            let full = self.backing.join(&rel);
            let res = match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&full),
                Ok(_) => fs::remove_file(&full),
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.materialized.remove(&rel);
        }
        for (rel, ino) in &want {
            if self.materialized.get(rel) == Some(ino) {
                continue;
            }
            let full = self.backing.join(rel);
            let Some(o) = self.objs.get(ino) else {
                continue;
            };
            match o.kind {
                Kind::Dir => {
                    fs::create_dir(&full)?;
                }
                Kind::File => fs::write(&full, &o.durable)?,
            }
            fs::set_permissions(&full, fs::Permissions::from_mode(o.mode))?;
            self.materialized.insert(rel.clone(), *ino);
        }
        Ok(())
    }

    /// Power cut: the volatile view becomes the durable one, except for
    /// what `opts` lets survive. Disarms any trip.
    pub fn cut(&mut self, opts: CutOptions) -> io::Result<CutReport> {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut report = CutReport {
            tripped: self.tripped.take(),
            ..CutReport::default()
        };
        self.trip = None;
        self.stats.cuts += 1;
        for op in std::mem::take(&mut self.pending) {
            if opts.keep_prob > 0.0 && rng.gen_bool(opts.keep_prob.min(1.0)) {
                self.apply_durable(&op);
                report.kept_ns.push(op.what);
            } else {
                report.dropped_ns.push(op.what);
            }
        }
        let mut inos: Vec<Ino> = self
            .objs
            .iter()
            .filter(|(_, o)| !o.log.is_empty())
            .map(|(i, _)| *i)
            .collect();
        inos.sort_unstable();
        let mut rewrite = Vec::new();
        for ino in inos {
            let path = self.path(ino);
            let Some(o) = self.objs.get_mut(&ino) else {
                continue;
            };
            let log = std::mem::take(&mut o.log);
            let mut fc = FileCut {
                path,
                ..FileCut::default()
            };
            let last = log.len() - 1;
            for (i, op) in log.iter().enumerate() {
                if i == last && opts.tear_last {
                    if let DataOp::Write { off, data } = op {
                        let keep = rng.gen_range(0..=data.len());
                        fc.torn = Some((*off, keep, data.len()));
                        if keep > 0 {
                            write_into(&mut o.durable, *off, &data[..keep]);
                            rewrite.push(ino);
                        }
                        continue;
                    }
                }
                if opts.keep_prob > 0.0 && rng.gen_bool(opts.keep_prob.min(1.0)) {
                    op.apply(&mut o.durable);
                    fc.kept_ops += 1;
                    rewrite.push(ino);
                } else {
                    fc.dropped_ops += 1;
                    fc.dropped_bytes += match op {
                        DataOp::Write { data, .. } => data.len() as u64,
                        DataOp::SetLen(_) => 0,
                    };
                }
            }
            report.files.push(fc);
        }
        // Volatile := durable; objects no durable name reaches are gone.
        let tree = self.durable_tree();
        let live: BTreeSet<Ino> = tree.values().copied().collect();
        self.objs.retain(|i, _| live.contains(i));
        for o in self.objs.values_mut() {
            o.data = o.durable.clone();
            o.entries = o.dentries.clone();
            o.parent = None;
        }
        for (rel, ino) in &tree {
            if let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) {
                let pino = tree.get(parent).copied().unwrap_or(ROOT);
                if let Some(o) = self.objs.get_mut(ino) {
                    o.parent = Some((pino, name.as_bytes().to_vec()));
                }
            }
        }
        self.materialize()?;
        rewrite.sort_unstable();
        rewrite.dedup();
        for ino in rewrite {
            if let Some(o) = self.objs.get(&ino) {
                for rel in self.backing_paths(ino) {
                    fs::write(self.backing.join(rel), &o.durable)?;
                }
            }
        }
        self.last_report = Some(report.clone());
        Ok(report)
    }

    /// Checks that the backing directory holds exactly the durable view
    /// (for tests): the first difference, if any.
    pub fn check_backing(&self) -> Result<(), String> {
        let tree = self.durable_tree();
        let mut on_disk = BTreeSet::new();
        let mut stack = vec![(PathBuf::new(), 0usize)];
        while let Some((rel, depth)) = stack.pop() {
            let rd = fs::read_dir(self.backing.join(&rel)).map_err(|e| e.to_string())?;
            for e in rd {
                let e = e.map_err(|e| e.to_string())?;
                let p = rel.join(e.file_name());
                let is_dir = e.file_type().map_err(|e| e.to_string())?.is_dir();
                if is_dir && depth < MAX_DEPTH {
                    stack.push((p.clone(), depth + 1));
                }
                on_disk.insert(p);
            }
        }
        for (rel, ino) in &tree {
            if rel.as_os_str().is_empty() {
                continue;
            }
            if !on_disk.remove(rel) {
                return Err(format!("{} missing in backing", rel.display()));
            }
            let o = self.obj(*ino).map_err(|e| format!("errno {e}"))?;
            if o.kind == Kind::File {
                let got = fs::read(self.backing.join(rel)).map_err(|e| e.to_string())?;
                if got != o.durable {
                    return Err(format!("{} differs in backing", rel.display()));
                }
            }
        }
        match on_disk.into_iter().next() {
            Some(extra) => Err(format!("{} in backing but not durable", extra.display())),
            None => Ok(()),
        }
    }
}
