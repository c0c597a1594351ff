//! The journal's lock is the process's, not its children's: a child
//! forked while the journal is open (as `std::process::Command` does) must
//! not keep the journal locked after the parent closed it.

use coil_journal::{Journal, JournalError};

#[test]
fn a_forked_child_does_not_keep_a_closed_journal_locked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path()).expect("open");
    // A child that holds copies of every descriptor, the LOCK file's too,
    // for a second without exec'ing (the window between a fork and an
    // exec, made long).
    // SAFETY: the child only sleeps and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: async-signal-safe calls only.
        unsafe {
            libc::sleep(1);
            libc::_exit(0);
        }
    }
    j.close().expect("close");
    // While the child still holds its copy, a second open must work.
    let again = Journal::open(dir.path());
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match again {
        Ok(j) => drop(j),
        Err(JournalError::Locked { .. }) => {
            panic!("the closed journal stayed locked by a forked child's copy of its LOCK")
        }
        Err(e) => panic!("reopen: {e}"),
    }
    // And the lock still excludes a second opener while open.
    let j = Journal::open(dir.path()).expect("open");
    assert!(matches!(
        Journal::open(dir.path()),
        Err(JournalError::Locked { .. })
    ));
    drop(j);
}
