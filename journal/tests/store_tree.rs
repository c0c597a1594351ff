//! The opaque store tree that the embedded cluster store lives in.

use coil_journal::{Batch, Journal, JournalError};

#[test]
fn store_entries_round_trip_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let j = Journal::open(dir.path()).expect("open");
        let mut b = Batch::new();
        b.put_store(b"/coil/pools/a", b"{\"x\":1}")
            .put_store(b"/coil/pools/b", b"{\"x\":2}")
            .put_store(b"/coil/zz", b"z");
        j.commit(b).expect("commit");
        let mut b = Batch::new();
        b.delete_store(b"/coil/pools/b");
        j.commit(b).expect("commit");
        assert_eq!(
            j.store_get(b"/coil/pools/a").expect("get"),
            Some(b"{\"x\":1}".to_vec())
        );
        j.checkpoint().expect("checkpoint");
        j.close().expect("close");
    }
    let j = Journal::open(dir.path()).expect("reopen");
    let r = j
        .store_range(b"/coil/pools/", b"/coil/pools0")
        .expect("range");
    assert_eq!(r, vec![(b"/coil/pools/a".to_vec(), b"{\"x\":1}".to_vec())]);
    assert_eq!(j.store_range(b"/coil/", b"").expect("all").len(), 2);
    let d = j.dump();
    assert_eq!(d.store.len(), 2);
    assert!(d.corrupt.is_empty());
    assert!(j.verify().is_clean());
}

#[test]
fn bad_store_entries_are_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path()).expect("open");
    let mut b = Batch::new();
    b.put_store(b"/ok", b"1").put_store(b"", b"empty key");
    assert!(matches!(j.commit(b), Err(JournalError::Invalid(_))));
    let mut b = Batch::new();
    b.put_store(b"/big", &vec![0u8; (1 << 20) + 1]);
    assert!(matches!(j.commit(b), Err(JournalError::Invalid(_))));
    assert_eq!(
        j.store_get(b"/ok").expect("get"),
        None,
        "batch applied partly"
    );
}
