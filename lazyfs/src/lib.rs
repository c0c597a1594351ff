//! coil-lazyfs: a test-only FUSE filesystem that forgets, like a power cut.
//!
//! It serves a tree whose durable state lives in a real backing directory.
//! Writes and truncations stay in memory per file until that file is
//! fsynced or fdatasynced; creates, renames and unlinks stay pending until
//! their directory is fsynced (ext4 may lose them otherwise). On command
//! ([`Mount::cut`], or writing `cut` to the control file
//! `MOUNT/.lazyfs-control`) it forgets everything unsynced, optionally keeps
//! some unsynced operations or a torn prefix of each file's last unsynced
//! write, and reports what it dropped.
//!
//! A [`Trip`] makes the filesystem fail (EIO) from a chosen operation on,
//! so a test can cut power *exactly* before, say, the rename of a
//! checkpoint file, without failpoints in the code under test.
//!
//! Supported: regular files and directories, read/pread, write/pwrite,
//! ftruncate, fsync, fdatasync, fsync of a directory, create, mkdir,
//! unlink, rmdir, rename (and RENAME_NOREPLACE), chmod, flock and POSIX
//! locks (handled by the kernel). Not supported: symlinks, hard links,
//! fallocate, xattrs, mknod, RENAME_EXCHANGE; shared writable mmap (every
//! file is opened with direct I/O so the kernel caches no page that a cut
//! would have to invalidate); O_APPEND is only as good as the kernel's idea
//! of the size. Timestamps are fixed. Test-only: never a dependency of the
//! product crates.
//!
//! The `coil-lazyfs BACKING MOUNTPOINT` binary serves a mount until SIGTERM,
//! for harnesses that are not Rust tests.

pub mod core;
mod fuse;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use crate::core::{Core, CutOptions, CutReport, FileCut, Kind, OpKind, Stats, Trip};

/// Name of the control file in the mount's root (not listed by readdir).
/// Writing `cut` forgets everything unsynced; `cut tear`, `cut keep=0.3`
/// and `seed=N` adjust it; `arm OP SKIP PATH` arms a trip. Reading it
/// returns the last cut's report.
pub const CONTROL_NAME: &str = ".lazyfs-control";

/// A mounted lazy filesystem. Dropping it unmounts (lazily if busy), also
/// while a panic unwinds.
#[derive(Debug)]
pub struct Mount {
    core: Arc<Mutex<Core>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mount {
    /// Mounts the durable state in `backing` (created if missing) at
    /// `mountpoint` (created if missing). Needs root or fusermount3, and
    /// /dev/fuse.
    pub fn new(backing: &Path, mountpoint: &Path) -> io::Result<Mount> {
        std::fs::create_dir_all(mountpoint)?;
        let core = Arc::new(Mutex::new(Core::load(backing)?));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("coil-lazyfs".into()),
            fuser::MountOption::Subtype("lazyfs".into()),
        ];
        let fs = fuse::LazyFs::new(Arc::clone(&core));
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        let m = Mount {
            core,
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
        };
        // The first access waits for the kernel's INIT handshake.
        std::fs::metadata(mountpoint)?;
        Ok(m)
    }

    /// Whether this machine can mount FUSE filesystems at all (tests skip
    /// when it cannot, unless COIL_REQUIRE_FUSE=1).
    pub fn available() -> bool {
        Path::new("/dev/fuse").exists()
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> PathBuf {
        lock(&self.core).backing().to_path_buf()
    }

    /// Power cut: forgets what was not synced (see [`CutOptions`]).
    pub fn cut(&self, opts: CutOptions) -> io::Result<CutReport> {
        lock(&self.core).cut(opts)
    }

    /// Arms a trip (see [`Trip`]).
    pub fn arm(&self, trip: Trip) {
        lock(&self.core).arm(trip);
    }

    /// What the armed trip fired on, if it has.
    pub fn tripped(&self) -> Option<String> {
        lock(&self.core).tripped().map(str::to_owned)
    }

    pub fn stats(&self) -> Stats {
        lock(&self.core).stats()
    }

    /// Runs `f` on the state (for tests: e.g. [`Core::check_backing`]).
    pub fn with_core<T>(&self, f: impl FnOnce(&mut Core) -> T) -> T {
        f(&mut lock(&self.core))
    }

    /// Unmounts and waits for the server thread.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    /// Detaches the mount (umount -l) and lets the server thread end in the
    /// background; returns at once. A plain unmount waits for the kernel
    /// to tear the connection down, which was seen to take seconds to
    /// minutes on a loaded machine after a process with open files on it
    /// was killed. Remount at another mountpoint afterwards: the old
    /// session may still unmount its own path when it ends.
    pub fn detach(self) {
        // Drop does exactly this.
        drop(self);
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(e) => {
                // Busy (a child still holds a file) or already gone: detach.
                lazy_unmount(&self.mountpoint);
                Err(e)
            }
        }
    }
}

/// umount -l, then fusermount3 -u -z: never fails, never blocks.
fn lazy_unmount(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path; umount2 has no other inputs.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if rc == 0 {
            return;
        }
    }
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            // Detach, never wait: a process the test left running (it
            // panicked before killing it) may still pin the mount.
            lazy_unmount(&self.mountpoint);
            let _ = std::thread::Builder::new()
                .name("lazyfs-detach".into())
                .spawn(move || {
                    let _ = s.join();
                });
        }
    }
}

/// Merges figures into the bench summary JSON (`COIL_BENCH_SUMMARY`, or
/// `default_path`): `{"name": {"value": v, "unit": u}}`, the format of
/// coil's `testkit::write_bench_summary` (which journal tests cannot use).
pub fn write_bench_summary(
    default_path: &Path,
    figures: &[(&str, f64, &str)],
) -> Result<PathBuf, String> {
    let path = std::env::var_os("COIL_BENCH_SUMMARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| default_path.to_path_buf());
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let mut all: std::collections::BTreeMap<String, serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (name, value, unit) in figures {
        let v = (value * 1000.0).round() / 1000.0;
        all.insert(
            (*name).to_string(),
            serde_json::json!({"value": v, "unit": unit}),
        );
    }
    let text = serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}
