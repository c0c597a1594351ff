//! Journals written in format 1 (before WAL frames carried their segment's
//! salt and synced seq) still open, replay, and take new commits; and
//! opening one marks it as the current format before writing anything.
//!
//! Two sources of format 1 bytes: `fixtures/format1/`, a CHECKPOINT and WAL
//! segment written by the build before format 2 (eight commits and an
//! abandon, so everything is in the WAL), and an encoder here that writes the
//! format 1 layouts field by field (`common::raw`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use coil_journal::*;
use common::raw::{self, WalOpV1};
use common::*;

fn fixture_copy(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1");
    fs::create_dir_all(to.join("wal")).expect("mkdir");
    fs::copy(from.join("CHECKPOINT"), to.join("CHECKPOINT")).expect("copy");
    for e in fs::read_dir(from.join("wal")).expect("fixture wal") {
        let p = e.expect("entry").path();
        fs::copy(&p, to.join("wal").join(p.file_name().expect("name"))).expect("copy");
    }
}

fn version_of(path: &Path) -> u16 {
    let b = fs::read(path).expect("read");
    u16::from_le_bytes([b[4], b[5]])
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir.join("wal"))
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// What the fixture holds: node meta; leases 0-5 and store entries
/// /registry/k0-k5; then an AcquireBlock intent, and deletes of k2 and lease 5.
fn assert_fixture_contents(j: &Journal) {
    let meta = j.node_meta().expect("read").expect("node meta");
    assert_eq!(
        (meta.node_name.as_str(), meta.boot_id.as_str()),
        ("node-a", "boot-1")
    );
    let leases = j.leases().expect("leases decode");
    let mut want: Vec<_> = (0..5).map(|i| lease(i, 1)).collect();
    want.sort_by_key(|l| l.block);
    let mut got = leases.clone();
    got.sort_by_key(|l| l.block);
    assert_eq!(got, want);
    for i in 0..6 {
        let k = format!("/registry/k{i}");
        let want = (i != 2).then(|| format!("value-{i}").into_bytes());
        assert_eq!(j.store_get(k.as_bytes()).expect("read"), want, "{k}");
    }
    let intents = j.intents().expect("intents decode");
    assert_eq!(intents.len(), 1);
    assert_eq!(
        intents[0].op,
        IntentOp::AcquireBlock {
            pool: "default".into(),
            block: Some(block(1)),
        }
    );
    assert!(j.verify().corrupt.is_empty());
}

#[test]
fn a_journal_written_by_the_previous_build_opens_and_keeps_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    fixture_copy(dir.path());
    let old_segment = segments(dir.path()).pop().expect("fixture segment");
    assert_eq!(version_of(&dir.path().join("CHECKPOINT")), 1);
    assert_eq!(version_of(&old_segment), 1);

    let j = Journal::open(dir.path()).expect("a format 1 journal opens");
    let r = j.open_report().clone();
    assert_eq!((r.replayed_batches, r.last_seq), (8, 8), "{r:?}");
    assert!(r.torn_tails.is_empty());
    assert_fixture_contents(&j);
    // Marked as format 2 before anything of format 2 was written, so an
    // older coil refuses it instead of misreading the new frames.
    assert_eq!(
        version_of(&dir.path().join("CHECKPOINT")),
        envelope::FORMAT_VERSION
    );
    let newest = segments(dir.path()).pop().expect("new segment");
    assert_eq!(version_of(&newest), envelope::FORMAT_VERSION);

    let mut b = Batch::new();
    b.put_store(b"/registry/new", b"after the upgrade");
    assert_eq!(j.commit(b).expect("commit").seq, 9);
    j.abandon();

    let j = Journal::open(dir.path()).expect("reopen");
    assert!(j.open_report().torn_tails.is_empty());
    assert_fixture_contents(&j);
    assert_eq!(
        j.store_get(b"/registry/new").expect("read").as_deref(),
        Some(&b"after the upgrade"[..])
    );
    j.close().expect("close");
    let j = Journal::open(dir.path()).expect("reopen after checkpoint");
    assert_fixture_contents(&j);
}

/// A format 1 journal whose one segment holds `n` store puts, seqs 1..=n.
fn format1_journal(dir: &Path, n: u64) -> (PathBuf, Vec<usize>) {
    fs::create_dir_all(dir.join("wal")).expect("mkdir");
    fs::write(
        dir.join("CHECKPOINT"),
        raw::seal(
            1,
            raw::KIND_FORMAT,
            &raw::payload(&raw::CheckpointV1 {
                format_version: 1,
                seq: 0,
            }),
        ),
    )
    .expect("write checkpoint");
    let mut seg = raw::seal(
        1,
        raw::KIND_SEGMENT_HEADER,
        &raw::payload(&raw::SegmentHeaderV1 {
            format_version: 1,
            first_seq: 1,
        }),
    );
    let mut offsets = vec![];
    for seq in 1..=n {
        let ops: Vec<WalOpV1> = vec![raw::store_put_v1(&format!("k{seq}"), &format!("v{seq}"))];
        offsets.push(seg.len());
        seg.extend(raw::seal(
            1,
            raw::KIND_WAL_BATCH,
            &raw::payload(&raw::WalBatchV1 { seq, ops }),
        ));
    }
    let path = dir.join("wal").join(format!("{:020}.wal", 1));
    fs::write(&path, seg).expect("write segment");
    (path, offsets)
}

#[test]
fn format1_frames_built_by_hand_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    format1_journal(dir.path(), 30);
    let j = Journal::open(dir.path()).expect("open");
    assert_eq!(j.open_report().last_seq, 30);
    for seq in 1..=30 {
        assert_eq!(
            j.store_get(format!("k{seq}").as_bytes()).expect("read"),
            Some(format!("v{seq}").into_bytes())
        );
    }
}

#[test]
fn damage_in_format1_frames_keeps_the_previous_rules() {
    // Format 1 frames cannot prove what was acknowledged: damage with at most
    // MAX_UNSYNCED_FRAMES valid frames after it is still cut off as a torn
    // tail, and more than that is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let (seg, offsets) = format1_journal(dir.path(), 10);
    let mut b = fs::read(&seg).expect("read");
    b[offsets[6] + 20] ^= 0x10;
    fs::write(&seg, &b).expect("write");
    let j = Journal::open(dir.path()).expect("cut as before");
    let r = j.open_report();
    assert_eq!(r.last_seq, 6);
    assert_eq!(r.torn_tails.len(), 1);
    assert_eq!(r.torn_tails[0].later_valid_frames, 3);
    drop(j);

    let dir = tempfile::tempdir().expect("tempdir");
    // More valid frames after the damage than MAX_UNSYNCED_FRAMES (128).
    let n = 128 + 10;
    let (seg, offsets) = format1_journal(dir.path(), n);
    let mut b = fs::read(&seg).expect("read");
    b[offsets[5] + 20] ^= 0x10;
    fs::write(&seg, &b).expect("write");
    let err = Journal::open(dir.path()).expect_err("deep damage is refused");
    match &err {
        JournalError::Corrupt { key, reason } => {
            assert!(key.ends_with(&format!("@{}", offsets[5])), "{key}");
            assert!(reason.contains("valid frames follow"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(fs::read(&seg).expect("read"), b, "nothing cut off");
}
