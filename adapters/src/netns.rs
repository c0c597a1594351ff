//! Checked opening of a pod's network namespace path.
//!
//! CNI_NETNS comes from the caller. coild uses it only if it is a network
//! namespace (a file on nsfs whose namespace type is CLONE_NEWNET) and
//! neither coild's own nor the host's (pid 1's): anything else would wire
//! a pod's address and default route into the node itself. The path is
//! first opened with O_PATH, which has no side effect on any file type
//! (a FIFO does not block, a device is not opened); only a verified nsfs
//! file is then reopened for real, through /proc/self/fd so the checked
//! inode is the one used. Path lookup itself can still block (a hung FUSE
//! or NFS mount), so async callers run [`open`] on a blocking thread with
//! a deadline (see `kernel::Kernel`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// statfs(2) f_type of nsfs.
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// ioctl NS_GET_NSTYPE (`_IO(0xb7, 0x3)`), Linux 4.11+.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Identity of a namespace: device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

/// Why a path is not usable as a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {0} does not exist")]
    Missing(String),
    #[error("CNI_NETNS {path} is not a network namespace: {why}")]
    NotNetns { path: String, why: String },
    #[error("CNI_NETNS {path} is {whose}'s network namespace; pods need their own")]
    Forbidden { path: String, whose: &'static str },
    #[error("opening network namespace {path}: {msg}")]
    Io { path: String, msg: String },
}

/// The namespaces a pod may never be wired into.
#[derive(Debug, Clone, Default)]
pub struct Forbidden {
    entries: Vec<(NsId, &'static str)>,
}

impl Forbidden {
    /// coild's own network namespace and the host's (pid 1's).
    pub fn own_and_host() -> Forbidden {
        let mut f = Forbidden::default();
        for (p, whose) in [
            ("/proc/self/ns/net", "coild"),
            ("/proc/1/ns/net", "the host"),
        ] {
            if let Ok(m) = std::fs::metadata(p) {
                f.entries.push((
                    NsId {
                        dev: m.dev(),
                        ino: m.ino(),
                    },
                    whose,
                ));
            }
        }
        f
    }

    /// Also forbids the namespace at `path` (a tool working on a node's
    /// namespace from outside forbids that node's).
    pub fn with(mut self, path: &str, whose: &'static str) -> Forbidden {
        if let Ok(m) = std::fs::metadata(path) {
            self.entries.push((
                NsId {
                    dev: m.dev(),
                    ino: m.ino(),
                },
                whose,
            ));
        }
        self
    }

    fn whose(&self, id: NsId) -> Option<&'static str> {
        self.entries.iter().find(|(i, _)| *i == id).map(|(_, w)| *w)
    }
}

fn io(path: &str, e: impl std::fmt::Display) -> NetnsError {
    NetnsError::Io {
        path: path.to_string(),
        msg: e.to_string(),
    }
}

/// Opens `path` as a pod's network namespace, or says why it is not one.
/// Blocking (path lookup); never hangs on a FIFO and has no side effect on
/// devices.
pub fn open(path: &str, forbidden: &Forbidden) -> Result<File, NetnsError> {
    let not = |why: &str| NetnsError::NotNetns {
        path: path.to_string(),
        why: why.to_string(),
    };
    if !path.starts_with('/') {
        return Err(not("not an absolute path"));
    }
    let c = std::ffi::CString::new(path).map_err(|_| not("contains a NUL byte"))?;
    // SAFETY: c is a valid NUL-terminated string; the returned fd is owned
    // below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => NetnsError::Missing(path.to_string()),
            _ => io(path, e),
        });
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let opath = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: opath is a valid fd and sfs a properly sized buffer.
    if unsafe { libc::fstatfs(opath.as_raw_fd(), &mut sfs) } != 0 {
        return Err(io(path, std::io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)]
    if sfs.f_type as i64 != NSFS_MAGIC {
        return Err(not("not on nsfs (a namespace file)"));
    }
    // Reopen the very inode checked above for real (setns and the veth's
    // peer need a regular descriptor).
    let file =
        File::open(format!("/proc/self/fd/{}", opath.as_raw_fd())).map_err(|e| io(path, e))?;
    // SAFETY: file is a valid fd; NS_GET_NSTYPE takes no argument.
    let t = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if t < 0 {
        return Err(not(&format!(
            "the namespace type cannot be read: {}",
            std::io::Error::last_os_error()
        )));
    }
    if t != libc::CLONE_NEWNET {
        return Err(not("a namespace of another type"));
    }
    let m = file.metadata().map_err(|e| io(path, e))?;
    let id = NsId {
        dev: m.dev(),
        ino: m.ino(),
    };
    if let Some(whose) = forbidden.whose(id) {
        return Err(NetnsError::Forbidden {
            path: path.to_string(),
            whose,
        });
    }
    Ok(file)
}

/// Is `path` a pod network namespace that still exists? (Recovery's test:
/// a path that is missing or is not a pod's netns counts as gone.)
pub fn alive(path: &str, forbidden: &Forbidden) -> bool {
    !path.is_empty() && open(path, forbidden).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_namespaces_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("cstr");
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let f = Forbidden::default();
        let p = fifo.to_str().expect("utf8");
        // A FIFO with no writer would block a plain open forever.
        assert!(matches!(open(p, &f), Err(NetnsError::NotNetns { .. })));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(
            open(file.to_str().expect("utf8"), &f),
            Err(NetnsError::NotNetns { .. })
        ));
        assert!(matches!(
            open(dir.path().to_str().expect("utf8"), &f),
            Err(NetnsError::NotNetns { .. })
        ));
        assert!(matches!(
            open("/dev/null", &f),
            Err(NetnsError::NotNetns { .. })
        ));
        assert!(matches!(
            open(&format!("{p}-missing"), &f),
            Err(NetnsError::Missing(_))
        ));
        assert!(matches!(
            open("relative/path", &f),
            Err(NetnsError::NotNetns { .. })
        ));
        // Another kind of namespace is not a network namespace.
        assert!(matches!(
            open("/proc/self/ns/uts", &f),
            Err(NetnsError::NotNetns { .. })
        ));
        assert!(!alive(p, &f));
        assert!(!alive("", &f));
    }

    #[test]
    fn own_and_host_namespaces_are_forbidden() {
        let f = Forbidden::own_and_host();
        assert!(matches!(
            open("/proc/self/ns/net", &f),
            Err(NetnsError::Forbidden { .. })
        ));
        // Pid 1's namespace is refused; where the sandbox hides it (no
        // access to /proc/1/ns), opening it fails outright.
        match open("/proc/1/ns/net", &f) {
            Err(NetnsError::Forbidden { .. }) => {}
            Err(NetnsError::Io { .. }) => {
                assert!(std::fs::metadata("/proc/1/ns/net").is_err());
            }
            other => panic!("pid 1's netns accepted: {other:?}"),
        }
        // The same namespaces are fine when nothing is forbidden.
        assert!(open("/proc/self/ns/net", &Forbidden::default()).is_ok());
        assert!(!alive("/proc/self/ns/net", &f));
    }
}
