//! The durability barrier: the calls that really put bytes on the disk.
//!
//! sled 0.34's `flush()` writes with `sync_file_range`, which neither flushes
//! the drive's cache nor persists file metadata (sled issue #1452). The
//! journal therefore never relies on it alone: WAL frames are made durable
//! with `fdatasync`, and a sled checkpoint is `flush()` followed by an
//! `fsync` of every file and directory under sled's directory.

use std::fs::{self, File};
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
