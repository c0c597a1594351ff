//! `Journal::commit_deferred`: written before it returns, synced soon after.
//! (Power cuts are in powercut.rs; these need no FUSE.)

mod common;

use coil_journal::*;

fn record(i: u32) -> Attachment {
    common::run_record(9, 0, i, "deferred")
}

#[test]
fn reads_see_a_deferred_commit_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(tmp.path()).expect("open");
    for i in 0..100 {
        let mut b = Batch::new();
        b.put_attachment(&record(i));
        j.commit_deferred(b).expect("deferred commit");
        // Read right away: the read waits for the sync if it has not run.
        assert_eq!(
            j.attachment(&record(i).key).expect("read"),
            Some(record(i)),
            "deferred commit {i} not visible"
        );
    }
    assert_eq!(j.attachments().expect("read").len(), 100);
    j.close().expect("close");
}

/// A process crash (no final checkpoint, no sync of our own) keeps every
/// deferred commit: its frame is in the file before commit_deferred returns.
#[test]
fn a_deferred_commit_survives_the_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(tmp.path()).expect("open");
    let mut b = Batch::new();
    b.put_attachment(&Attachment {
        state: AttachmentState::Reserved,
        ..record(1)
    });
    j.commit(b).expect("commit");
    let mut b = Batch::new();
    b.put_attachment(&Attachment {
        state: AttachmentState::Wired,
        ..record(1)
    })
    .put_attachment(&record(2));
    j.commit_deferred(b).expect("deferred commit");
    j.abandon();
    let j = Journal::open(tmp.path()).expect("reopen");
    let a = j
        .attachment(&record(1).key)
        .expect("read")
        .expect("record 1");
    assert_eq!(a.state, AttachmentState::Wired);
    assert!(j.attachment(&record(2).key).expect("read").is_some());
    j.close().expect("close");
}

/// A failed background sync poisons the journal like a failed commit:
/// later commits and reads of unsynced data fail instead of lying.
#[test]
fn a_failed_deferred_sync_poisons_the_journal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(tmp.path()).expect("open");
    j.inject_sync_failure();
    let mut b = Batch::new();
    b.put_attachment(&record(3));
    j.commit_deferred(b).expect("deferred commit is written");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !j.is_poisoned() {
        assert!(std::time::Instant::now() < deadline, "never poisoned");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(j.attachment(&record(3).key).is_err());
    let mut b = Batch::new();
    b.put_attachment(&record(4));
    assert!(j.commit(b).is_err());
}
