//! The durability barrier: the calls that really put bytes on the disk.
//!
//! sled 0.34's `flush()` writes with `sync_file_range`, which neither flushes
//! the drive's cache nor persists file metadata (sled issue #1452). The
//! journal therefore never relies on it alone: WAL frames are made durable
//! with `fdatasync`, and a sled checkpoint is `flush()` followed by an
//! `fsync` of every file and directory under sled's directory.
//!
//! Also the journal's file modes: its records name pods and network
//! namespaces, so its directories are 0700 and its files 0600.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{JournalError, Result};

/// fsyncs a directory, so entries created, renamed or removed in it survive
/// a power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| JournalError::io("open dir", dir, e))?;
    f.sync_all()
        .map_err(|e| JournalError::io("fsync dir", dir, e))
}

/// fsyncs every regular file below `dir` and every directory on the way.
pub(crate) fn sync_tree(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| JournalError::io("read dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("read dir", dir, e))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| JournalError::io("stat", &path, e))?;
        if ft.is_dir() {
            sync_tree(&path)?;
        } else if ft.is_file() {
            match File::open(&path) {
                Ok(f) => f
                    .sync_all()
                    .map_err(|e| JournalError::io("fsync", &path, e))?,
                // sled may remove a file (an old snapshot) while we walk.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JournalError::io("open", &path, e)),
            }
        }
    }
    sync_dir(dir)
}

/// Removes sled's unfinished snapshots (`snap.*.generating`) from
/// `sled_dir`. sled 0.34 reads the newest `snap.*` file, an unfinished one
/// included, and refuses to open when it is torn or empty, as a power cut
/// or a kill -9 while sled writes it leaves it. Removing it yields exactly
/// the state of a crash just before sled created it (sled changes nothing
/// else until the file is complete and renamed), which sled recovers from
/// with its previous snapshot and its log. Found by
/// journal/tests/powercut.rs.
pub(crate) fn remove_unfinished_sled_snapshots(sled_dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(sled_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(JournalError::io("read dir", sled_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("read dir", sled_dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let path = entry.path();
            tracing::warn!(path = %path.display(), "removing an unfinished sled snapshot");
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JournalError::io("remove", &path, e)),
            }
        }
    }
    Ok(())
}

/// Mode of the journal's directories.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of the journal's files.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` with mode 0700 (missing parents get the default mode: they
/// are not ours), or tightens it to 0700 if it exists. Every directory this
/// creates has its parent fsynced, so its entry survives a power cut (found
/// by journal/tests/powercut.rs: without it a cut could lose a new journal
/// with its acknowledged commits).
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    let created: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|e| JournalError::io("create dir", parent, e))?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(JournalError::io("create dir", dir, e)),
    }
    // The umask may have taken bits away, never added them; an existing
    // directory may be looser.
    restrict(dir, DIR_MODE)?;
    for d in created {
        match d.parent() {
            Some(p) if p.as_os_str().is_empty() => sync_dir(Path::new("."))?,
            Some(p) => sync_dir(p)?,
            None => {}
        }
    }
    Ok(())
}

/// Creates (or truncates) `path` for reading and writing with mode 0600. A
/// file that already existed is tightened to 0600 too.
pub(crate) fn create_private_file(path: &Path, op: &'static str) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| JournalError::io(op, path, e))?;
    let mode = f
        .metadata()
        .map_err(|e| JournalError::io("stat", path, e))?
        .permissions()
        .mode();
    if mode & 0o7777 != FILE_MODE {
        f.set_permissions(Permissions::from_mode(FILE_MODE))
            .map_err(|e| JournalError::io("chmod", path, e))?;
    }
    Ok(f)
}

/// Sets `path`'s mode to `mode` unless it already is.
fn restrict(path: &Path, mode: u32) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| JournalError::io("stat", path, e))?;
    if meta.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(path, Permissions::from_mode(mode))
            .map_err(|e| JournalError::io("chmod", path, e))?;
    }
    Ok(())
}

/// Tightens `dir` and every directory below it to 0700 and every regular
/// file to 0600: files created by a previous build or by sled (which uses
/// the process umask). Symlinks are left alone.
pub(crate) fn restrict_tree(dir: &Path) -> Result<()> {
    restrict(dir, DIR_MODE)?;
    let entries = fs::read_dir(dir).map_err(|e| JournalError::io("read dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("read dir", dir, e))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| JournalError::io("stat", &path, e))?;
        let res = if ft.is_dir() {
            restrict_tree(&path)
        } else if ft.is_file() {
            restrict(&path, FILE_MODE)
        } else {
            Ok(())
        };
        match res {
            // sled may remove a file (an old snapshot) while we walk.
            Err(JournalError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}
