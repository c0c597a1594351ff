//! Damaged journals: flipped bytes, truncated values, records in the wrong
//! place, torn and damaged WAL frames, missing segments, newer formats. Each
//! gives a typed error or a reported, bounded repair; never a panic, never a
//! silently wrong value, and never a cut that drops an acknowledged commit.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use coil_journal::*;
use common::*;
use proptest::prelude::*;

fn populate(dir: &Path, n: u32) -> Journal {
    let j = Journal::open(dir).expect("open");
    for i in 0..n {
        let mut b = Batch::new();
        b.put_attachment(&attachment(i, i));
        if i % 5 == 0 {
            b.put_lease(&lease(i, 1));
        }
        j.commit(b).expect("commit");
    }
    j
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

/// The WAL segment holding frames, after a crash-like close.
fn crashed_journal_with_frames(dir: &Path, n: u32) -> PathBuf {
    let j = populate(dir, n);
    j.abandon();
    segments(dir)
        .into_iter()
        .max_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a segment with frames")
}

fn frame_offsets(seg: &Path) -> Vec<(usize, usize)> {
    let b = fs::read(seg).expect("read segment");
    let mut out = vec![];
    let mut off = 0;
    while off < b.len() {
        let len = envelope::frame_len(&b[off..]).expect("frame");
        out.push((off, len));
        off += len;
    }
    out
}

fn flip(path: &Path, at: usize) {
    let mut b = fs::read(path).expect("read");
    b[at] ^= 0x20;
    fs::write(path, b).expect("write");
}

fn tree_snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// The attachments tree's key (format 2: container id, ifname, network).
fn att_key_bytes(k: &AttachmentKey) -> Vec<u8> {
    let mut v = k.container_id.as_bytes().to_vec();
    v.push(0);
    v.extend_from_slice(k.ifname.as_bytes());
    v.push(0);
    v.extend_from_slice(k.network.as_bytes());
    v
}

#[test]
fn flipped_byte_in_a_stored_value_is_corrupt_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path(), 10).close().expect("close");
    let k = key(3);
    let kb = att_key_bytes(&k);
    let db = sled::open(dir.path().join("sled")).expect("sled");
    let t = db.open_tree("attachments").expect("tree");
    let mut v = t.get(&kb).expect("get").expect("present").to_vec();
    let mid = v.len() / 2;
    v[mid] ^= 0x01;
    t.insert(&kb, v).expect("insert");
    db.flush().expect("flush");
    drop(t);
    drop(db);

    let j = Journal::open(dir.path()).expect("open");
    let err = j.attachment(&k).expect_err("corrupt value must not decode");
    match &err {
        JournalError::Corrupt { key, reason } => {
            assert_eq!(key, &format!("attachments/{k}"));
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(err.is_corruption());
    // Other records are unaffected; the scan stops at the damaged one.
    assert_eq!(j.attachment(&key(4)).expect("read"), Some(attachment(4, 4)));
    assert!(j.attachments().is_err());
    let v = j.verify();
    assert_eq!(v.corrupt.len(), 1, "{:?}", v.corrupt);
    assert_eq!(v.corrupt[0].key, format!("attachments/{k}"));
    assert!(!v.is_clean());
    let d = j.dump();
    assert_eq!(d.attachments.len(), 9);
}

#[test]
fn truncated_and_misplaced_values_are_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path(), 6).close().expect("close");
    let db = sled::open(dir.path().join("sled")).expect("sled");
    let atts = db.open_tree("attachments").expect("tree");
    let leases = db.open_tree("leases").expect("tree");
    // Truncate attachment 1.
    let k1 = att_key_bytes(&key(1));
    let v = atts.get(&k1).expect("get").expect("present");
    atts.insert(&k1, &v[..v.len() - 3]).expect("insert");
    // Put a lease value under attachment 2's key.
    let (_, lv) = leases.iter().next().expect("a lease").expect("read");
    atts.insert(att_key_bytes(&key(2)), lv).expect("insert");
    // Store attachment 4's value under attachment 5's key.
    let v4 = atts
        .get(att_key_bytes(&key(4)))
        .expect("get")
        .expect("present");
    atts.insert(att_key_bytes(&key(5)), v4).expect("insert");
    // A value that is not an envelope at all.
    atts.insert(att_key_bytes(&key(3)), b"garbage".as_slice())
        .expect("insert");
    db.flush().expect("flush");
    drop((atts, leases, db));

    let j = Journal::open(dir.path()).expect("open");
    let v = j.verify();
    let mut keys: Vec<_> = v.corrupt.iter().map(|c| c.key.clone()).collect();
    keys.sort();
    let mut want: Vec<_> = [1, 2, 3, 5]
        .iter()
        .map(|i| format!("attachments/{}", key(*i)))
        .collect();
    want.sort();
    assert_eq!(keys, want, "{:?}", v.corrupt);
    let reasons: Vec<_> = v.corrupt.iter().map(|c| c.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("truncated")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("Lease")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("key it is stored under")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("magic") || r.contains("truncated")),
        "{reasons:?}"
    );
}

#[test]
fn torn_last_frame_is_cut_off_and_reported_but_strict_mode_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = crashed_journal_with_frames(dir.path(), 20);
    let frames = frame_offsets(&seg);
    let (last_off, len) = *frames.last().expect("frames");
    // A 21st frame was being written when the power went: half of it
    // reached the disk. (A frame is applied only after its sync, so a torn
    // frame was never acknowledged nor applied.)
    let mut b = fs::read(&seg).expect("read");
    let off = b.len();
    let half = b[last_off..last_off + len / 2].to_vec();
    b.extend_from_slice(&half);
    fs::write(&seg, &b).expect("write");
    let before = tree_snapshot(dir.path());

    let strict = JournalOptions {
        recovery: RecoveryMode::Strict,
        ..Default::default()
    };
    let err = Journal::open_with(dir.path(), strict).expect_err("strict refuses a torn tail");
    assert!(
        matches!(err, JournalError::Corrupt { ref key, .. } if key.contains(".wal@")),
        "{err}"
    );
    let mut now = tree_snapshot(dir.path());
    now.retain(|p, _| p.starts_with(dir.path().join("wal")));
    let mut was = before.clone();
    was.retain(|p, _| p.starts_with(dir.path().join("wal")) && *p != seg);
    now.remove(&seg);
    assert_eq!(now, was, "a refused open must not touch the WAL");

    let j = Journal::open(dir.path()).expect("default mode cuts the torn tail");
    let r = j.open_report();
    assert_eq!(r.torn_tails.len(), 1);
    assert_eq!(r.torn_tails[0].offset, off as u64);
    assert_eq!(r.torn_tails[0].dropped_bytes, (len / 2) as u64);
    assert_eq!(
        r.last_seq, 20,
        "the torn frame is gone, the 20 before it are not"
    );
    assert_eq!(j.attachments().expect("read").len(), 20);
    // Appending continues after the cut and survives another crash.
    let mut b = Batch::new();
    b.put_attachment(&attachment(100, 1));
    assert_eq!(j.commit(b).expect("commit").seq, 21);
    j.abandon();
    let j = Journal::open(dir.path()).expect("reopen");
    assert!(j.open_report().torn_tails.is_empty());
    assert_eq!(j.attachments().expect("read").len(), 21);
}

/// Everything of the journal but sled's files (sled rewrites some of them
/// when it opens) and the LOCK file.
fn wal_and_checkpoint(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = tree_snapshot(dir);
    m.retain(|p, _| !p.starts_with(dir.join("sled")) && *p != dir.join("LOCK"));
    m
}

#[test]
fn damage_that_later_frames_prove_acknowledged_is_refused_and_nothing_is_cut() {
    // Sequential commits: each frame was written after the commit before it
    // had been synced and acknowledged, and records that in its synced seq.
    // The previous build cut off damage with up to 128 valid frames behind
    // it as a torn tail, dropping those acknowledged commits.
    for damaged in [12u64, 19] {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = crashed_journal_with_frames(dir.path(), 20);
        let frames = frame_offsets(&seg);
        // frames[0] is the segment header; frames[s] holds seq s.
        let (off, _) = frames[damaged as usize];
        flip(&seg, off + envelope::HEADER_LEN + 2);
        let before = wal_and_checkpoint(dir.path());
        let modes = [
            JournalOptions::default(),
            JournalOptions {
                recovery: RecoveryMode::Strict,
                ..Default::default()
            },
            JournalOptions {
                read_only: true,
                ..Default::default()
            },
        ];
        for opts in modes {
            let err = Journal::open_with(dir.path(), opts.clone())
                .expect_err("acknowledged damage must not open");
            match &err {
                JournalError::AcknowledgedDamage {
                    segment,
                    offset,
                    seq,
                    reason,
                    proof_seq,
                    proof_offset,
                    synced_seq,
                } => {
                    assert_eq!(segment, &seg);
                    assert_eq!(*offset, off as u64);
                    assert_eq!(*seq, damaged);
                    assert!(reason.contains("checksum"), "{reason}");
                    assert_eq!(*proof_seq, 20);
                    assert_eq!(*proof_offset, frames[20].0 as u64);
                    assert_eq!(*synced_seq, 19);
                }
                other => panic!("expected AcknowledgedDamage ({opts:?}), got {other}"),
            }
            assert!(err.is_corruption());
            let msg = err.to_string();
            for part in [
                seg.display().to_string(),
                format!("byte {off}"),
                format!("seq {damaged}"),
                "coilctl node repair --rebuild".to_string(),
            ] {
                assert!(msg.contains(&part), "{part:?} missing from: {msg}");
            }
            assert_eq!(
                wal_and_checkpoint(dir.path()),
                before,
                "a refused open must not cut or create anything"
            );
        }
    }
}

#[test]
fn damage_inside_the_last_unsynced_window_is_still_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = crashed_journal_with_frames(dir.path(), 20);
    let mut b = fs::read(&seg).expect("read");
    let salt = raw::segment_salt(&b);
    // Seqs 21 and 22 were written in one group-commit window after seq 20
    // had been synced; the power went before their sync and only 22's page
    // reached the disk. Neither was acknowledged.
    let frame = |seq: u64| {
        raw::seal(
            2,
            raw::KIND_WAL_BATCH,
            &raw::payload(&raw::WalBatchV2 {
                seq,
                salt,
                synced_seq: 20,
                ops: vec![raw::store_put_v1(&format!("k{seq}"), "v")],
            }),
        )
    };
    let (f21, f22) = (frame(21), frame(22));
    let off = b.len();
    b.extend(std::iter::repeat_n(0u8, f21.len()));
    b.extend_from_slice(&f22);
    fs::write(&seg, &b).expect("write");

    let j = Journal::open(dir.path()).expect("an unacknowledged window is repaired");
    let r = j.open_report();
    assert_eq!(r.torn_tails.len(), 1, "{r:?}");
    assert_eq!(r.torn_tails[0].offset, off as u64);
    assert_eq!(r.torn_tails[0].later_valid_frames, 1);
    assert_eq!(
        r.torn_tails[0].dropped_bytes,
        (f21.len() + f22.len()) as u64
    );
    assert_eq!(r.last_seq, 20);
    assert_eq!(j.store_get(b"k22").expect("read"), None);
    assert_eq!(j.attachments().expect("read").len(), 20);
    // The cut is at the damage; a background checkpoint may already have
    // removed the segment, which holds nothing past the checkpoint.
    if let Ok(m) = fs::metadata(&seg) {
        assert_eq!(m.len(), off as u64);
    }
}

#[test]
fn damage_in_an_older_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = crashed_journal_with_frames(dir.path(), 5);
    // Make a newer segment exist after it.
    let j = Journal::open(dir.path()).expect("open");
    let mut b = Batch::new();
    b.put_attachment(&attachment(50, 1));
    j.commit(b).expect("commit");
    // Keep the old segment from being removed by a checkpoint: copy it back.
    let saved = fs::read(&seg).expect("read");
    j.abandon();
    if !seg.exists() {
        fs::write(&seg, &saved).expect("restore");
    }
    let frames = frame_offsets(&seg);
    let (off, _) = *frames.last().expect("frames");
    flip(&seg, off + envelope::HEADER_LEN);
    assert!(segments(dir.path()).len() >= 2);
    let err = Journal::open(dir.path()).expect_err("older segment damage is refused");
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn a_missing_frame_is_a_gap_not_silence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = crashed_journal_with_frames(dir.path(), 6);
    let frames = frame_offsets(&seg);
    // Cut frame 3 (seq 3) out cleanly: every remaining frame is valid, but
    // the sequence numbers jump.
    let (off, len) = frames[3];
    let mut b = fs::read(&seg).expect("read");
    b.drain(off..off + len);
    fs::write(&seg, &b).expect("write");
    let err = Journal::open(dir.path()).expect_err("gap refused");
    match err {
        JournalError::Corrupt { reason, .. } => {
            assert!(reason.contains("gap: expected seq 3, found 4"), "{reason}")
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn newer_format_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path(), 3).close().expect("close");
    // A CHECKPOINT written by a future coil (format 9): rewrite the version
    // field and recompute the checksum so only the version is "wrong".
    let path = dir.path().join("CHECKPOINT");
    let mut b = fs::read(&path).expect("read");
    b[4..6].copy_from_slice(&9u16.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..12]);
    h.update(&b[16..]);
    let sum = h.finalize();
    b[12..16].copy_from_slice(&sum.to_le_bytes());
    fs::write(&path, &b).expect("write");
    let before = tree_snapshot(dir.path());
    let err = Journal::open(dir.path()).expect_err("newer format refused");
    assert!(
        matches!(
            err,
            JournalError::NewerFormat {
                found: 9,
                supported,
                ..
            } if supported == u32::from(envelope::FORMAT_VERSION)
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
    let mut after = tree_snapshot(dir.path());
    let mut before = before;
    // The LOCK file is created at open; everything else must be untouched.
    after.remove(&dir.path().join("LOCK"));
    before.remove(&dir.path().join("LOCK"));
    assert_eq!(after, before);
}

#[test]
fn corrupt_or_missing_checkpoint_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    populate(dir.path(), 3).close().expect("close");
    let path = dir.path().join("CHECKPOINT");
    flip(&path, 17);
    let err = Journal::open(dir.path()).expect_err("corrupt checkpoint");
    assert!(
        matches!(&err, JournalError::Corrupt { key, .. } if key == "CHECKPOINT"),
        "{err}"
    );
    assert!(err.to_string().contains("CHECKPOINT"));
    fs::remove_file(&path).expect("rm");
    let err = Journal::open(dir.path()).expect_err("missing checkpoint with data");
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(err.to_string().contains("coilctl node repair --rebuild") || err.is_corruption());
}

#[test]
fn second_opener_is_locked_out_and_read_only_refuses_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = populate(dir.path(), 2);
    let err = Journal::open(dir.path()).expect_err("locked");
    assert!(matches!(err, JournalError::Locked { .. }), "{err}");
    j.close().expect("close");
    let ro = Journal::open_with(
        dir.path(),
        JournalOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .expect("read-only open");
    assert_eq!(ro.attachments().expect("read").len(), 2);
    let mut b = Batch::new();
    b.put_attachment(&attachment(9, 9));
    assert!(matches!(ro.commit(b), Err(JournalError::ReadOnly { .. })));
    let missing = dir.path().join("nope");
    let err = Journal::open_with(
        &missing,
        JournalOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .expect_err("no journal");
    assert!(err.to_string().contains("no journal"), "{err}");
    assert!(!missing.exists(), "read-only open must not create anything");
}

#[test]
fn group_commit_shares_syncs_and_sequential_commits_each_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = std::sync::Arc::new(Journal::open(dir.path()).expect("open"));
    for i in 0..20 {
        let mut b = Batch::new();
        b.put_attachment(&attachment(i, 0));
        j.commit(b).expect("commit");
    }
    let s = j.stats();
    assert_eq!(
        (s.commits, s.syncs),
        (20, 20),
        "each lone commit waits for its own fdatasync"
    );
    let hs: Vec<_> = (0..8u32)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    let mut b = Batch::new();
                    b.put_attachment(&attachment(10_000 + t * 1000 + i, 0));
                    j.commit(b).expect("commit");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("thread");
    }
    let s = j.stats();
    assert_eq!(s.commits, 820);
    let concurrent_syncs = s.syncs - 20;
    assert!(
        concurrent_syncs < 800,
        "8 concurrent committers must share syncs: {concurrent_syncs} syncs for 800 commits"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Random damage anywhere in the WAL: opening either fails with a typed
    /// error or succeeds with every record intact; it never panics and never
    /// yields a record that differs from what was written.
    #[test]
    fn random_wal_damage_never_yields_wrong_records(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = crashed_journal_with_frames(dir.path(), 12);
        let mut b = fs::read(&seg).expect("read");
        for (i, x) in &flips {
            let at = i.index(b.len());
            b[at] ^= x;
        }
        if let Some(c) = cut {
            let n = c.index(b.len());
            b.truncate(n);
        }
        fs::write(&seg, &b).expect("write");
        match Journal::open(dir.path()) {
            Ok(j) => {
                for a in j.attachments().expect("records that load are intact") {
                    let i = u32::from_str_radix(&a.key.container_id, 16).expect("key");
                    prop_assert_eq!(&a, &attachment(i, i));
                }
                prop_assert!(j.verify().corrupt.is_empty());
            }
            Err(e) => prop_assert!(e.is_corruption(), "unexpected error kind: {}", e),
        }
    }
}
