//! The environment failpoint `COIL_JOURNAL_FAIL_SYNC_AFTER=N`, which other
//! crates' tests use to make a journal's WAL fdatasync fail after N good
//! ones. Only builds with the `failpoints` feature read it:
//!
//! ```text
//! cargo test -p coil-journal --features failpoints --test sync_failure_env
//! ```
//!
//! This binary holds one test, because the variable is process-wide.

mod common;

use coil_journal::*;
use common::*;

fn put(j: &Journal, i: u32) -> Result<CommitInfo> {
    let mut b = Batch::new();
    b.put_attachment(&attachment(i, i));
    j.commit(b)
}

#[test]
fn the_environment_failpoint_fails_the_sync_after_n() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::env::set_var(FAIL_SYNC_AFTER_ENV, "3");
    let j = Journal::open(dir.path()).expect("open");
    std::env::remove_var(FAIL_SYNC_AFTER_ENV);
    for i in 0..3 {
        put(&j, i).expect("the first three syncs succeed");
    }
    let res = put(&j, 3);
    if cfg!(feature = "failpoints") {
        assert!(matches!(res, Err(JournalError::Poisoned { .. })), "{res:?}");
        assert!(j.is_poisoned());
        assert!(matches!(put(&j, 4), Err(JournalError::Poisoned { .. })));
        drop(j);
        let j = Journal::open(dir.path()).expect("reopen, with the variable unset");
        assert_eq!(j.attachments().expect("read").len(), 3);
        put(&j, 5).expect("commits work again");
    } else {
        // Without the feature the variable is ignored.
        res.expect("no failpoints in this build");
        assert!(!j.is_poisoned());
    }
}
