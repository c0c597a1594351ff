//! A failed WAL fdatasync poisons the journal: the commit waiting for it and
//! every later one fail with `Poisoned`, `is_poisoned` says so, and a reopen
//! holds exactly the commits acknowledged before the failure. The failure is
//! injected with the test hook `Journal::inject_sync_failure`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use coil_journal::*;
use common::*;

fn put(j: &Journal, i: u32) -> Result<CommitInfo> {
    let mut b = Batch::new();
    b.put_attachment(&attachment(i, i));
    j.commit(b)
}

fn keys(j: &Journal) -> BTreeSet<String> {
    j.attachments()
        .expect("read")
        .into_iter()
        .map(|a| a.key.container_id)
        .collect()
}

fn want(ids: impl IntoIterator<Item = u32>) -> BTreeSet<String> {
    ids.into_iter().map(|i| key(i).container_id).collect()
}

#[test]
fn a_failed_sync_poisons_and_a_reopen_holds_exactly_the_acknowledged_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path()).expect("open");
    for i in 0..5 {
        put(&j, i).expect("commit");
    }
    assert!(!j.is_poisoned());
    assert_eq!(j.poison_reason(), None);

    j.inject_sync_failure();
    let err = put(&j, 5).expect_err("the sync under this commit fails");
    assert!(matches!(err, JournalError::Poisoned { .. }), "{err}");
    assert!(j.is_poisoned());
    let why = j.poison_reason().expect("a reason");
    assert!(
        why.contains("fdatasync") && why.contains("injected"),
        "{why}"
    );
    for i in 6..10 {
        let err = put(&j, i).expect_err("poisoned journals refuse commits");
        assert!(matches!(err, JournalError::Poisoned { .. }), "{err}");
    }
    assert!(matches!(j.checkpoint(), Err(JournalError::Poisoned { .. })));
    // Reads still answer from what was acknowledged.
    assert_eq!(keys(&j), want(0..5));
    let syncs = j.stats().syncs;
    drop(j); // its final checkpoint fails: poisoned

    let j = Journal::open(dir.path()).expect("a reopen works");
    assert!(!j.is_poisoned());
    assert!(j.open_report().torn_tails.is_empty());
    assert_eq!(j.open_report().last_seq, 5);
    assert_eq!(keys(&j), want(0..5), "exactly the acknowledged commits");
    assert_eq!(syncs, 5, "the failed sync is not counted");
    // And the reopened journal takes commits again.
    assert_eq!(put(&j, 42).expect("commit").seq, 6);
    j.close().expect("close");
    let j = Journal::open(dir.path()).expect("reopen");
    assert_eq!(keys(&j), want((0..5).chain([42])));
}

#[test]
fn concurrent_committers_each_see_poisoned_and_only_acknowledged_commits_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Arc::new(Journal::open(dir.path()).expect("open"));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let j = Arc::clone(&j);
            std::thread::spawn(move || {
                let mut acked = vec![];
                for i in 0..10_000u32 {
                    let id = t * 100_000 + i;
                    match put(&j, id) {
                        Ok(_) => acked.push(id),
                        Err(e) => {
                            assert!(matches!(e, JournalError::Poisoned { .. }), "{e}");
                            break;
                        }
                    }
                }
                // Once poisoned, always poisoned.
                for i in 0..3 {
                    let e = put(&j, t * 100_000 + 50_000 + i).expect_err("poisoned");
                    assert!(matches!(e, JournalError::Poisoned { .. }), "{e}");
                }
                acked
            })
        })
        .collect();
    while j.stats().commits < 40 {
        std::thread::yield_now();
    }
    j.inject_sync_failure();
    let mut acked = BTreeSet::new();
    for h in threads {
        acked.extend(h.join().expect("thread"));
    }
    assert!(j.is_poisoned());
    assert!(acked.len() >= 40, "{}", acked.len());
    drop(j);

    let j = Journal::open(dir.path()).expect("reopen");
    assert_eq!(keys(&j), want(acked));
}
