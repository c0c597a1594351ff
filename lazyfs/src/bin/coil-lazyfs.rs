//! `coil-lazyfs BACKING MOUNTPOINT`: serves BACKING at MOUNTPOINT until
//! SIGTERM or SIGINT, then unmounts. For harnesses that are not Rust tests
//! (a coild-level power cut): they cut power by writing `cut` (or
//! `cut tear seed=N`) to MOUNTPOINT/.lazyfs-control and read the report
//! back from it.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: coil-lazyfs BACKING MOUNTPOINT");
        return ExitCode::from(2);
    };
    // Block the signals before any thread starts, then wait for one.
    // SAFETY: plain libc calls on a local, initialised signal set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mount = match coil_lazyfs::Mount::new(backing, mountpoint) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("coil-lazyfs: mount {}: {e}", mountpoint.display());
            return ExitCode::FAILURE;
        }
    };
    println!(
        "coil-lazyfs: serving {} at {}",
        backing.display(),
        mountpoint.display()
    );
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised; `sig` is a valid out pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    match mount.unmount() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coil-lazyfs: unmount (detached instead): {e}");
            ExitCode::FAILURE
        }
    }
}
