//! The `coil-lazyfs` binary: mounts, cuts through the control file, and
//! unmounts on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_binary_serves_cuts_and_unmounts_on_sigterm() {
    if !coil_lazyfs::Mount::available() {
        eprintln!("SKIPPED: no /dev/fuse");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = (tmp.path().join("b"), tmp.path().join("m"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_coil-lazyfs"))
        .arg(&backing)
        .arg(&mnt)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn coil-lazyfs");
    let ctl = mnt.join(coil_lazyfs::CONTROL_NAME);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctl.exists() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            if std::env::var("COIL_REQUIRE_FUSE").as_deref() == Ok("1") {
                panic!("coil-lazyfs exited: {status}");
            }
            eprintln!("SKIPPED: coil-lazyfs could not mount ({status})");
            return;
        }
        assert!(Instant::now() < deadline, "coil-lazyfs never mounted");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(mnt.join("kept"), b"k").expect("write");
    let f = std::fs::File::open(mnt.join("kept")).expect("open");
    f.sync_all().expect("fsync");
    std::fs::File::open(&mnt)
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
    std::fs::write(mnt.join("lost"), b"l").expect("write");
    std::fs::write(&ctl, b"cut").expect("cut");
    let report = std::fs::read_to_string(&ctl).expect("report");
    assert!(report.contains("dropped create /lost"), "{report}");
    assert_eq!(std::fs::read(mnt.join("kept")).expect("read"), b"k");
    assert!(!mnt.join("lost").exists());
    drop(f);
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("coil-lazyfs did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert!(!ctl.exists(), "still mounted");
    assert_eq!(std::fs::read(backing.join("kept")).expect("backing"), b"k");
}
