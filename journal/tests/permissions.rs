//! The journal holds pod names and network namespace paths: its directory
//! tree is 0700 and its files 0600, whatever the umask, and opening tightens
//! a journal left looser by an earlier build. A read-only open changes
//! nothing.
//!
//! Every test here sets the umask to 0, so a file created without an
//! explicit mode would come out 0666 (this binary holds only these tests).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use coil_journal::*;
use common::*;

fn no_umask() {
    // SAFETY: umask only swaps the process's file mode mask.
    unsafe { libc::umask(0) };
}

/// Mode of every directory and regular file from `dir` down.
fn modes(dir: &Path) -> BTreeMap<PathBuf, u32> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        out.insert(d.clone(), mode(&d));
        for e in fs::read_dir(&d).expect("read dir") {
            let e = e.expect("entry");
            let ft = e.file_type().expect("type");
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.insert(e.path(), mode(&e.path()));
            }
        }
    }
    out
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
}

fn assert_private(dir: &Path) {
    let m = modes(dir);
    let mut kinds = (0, 0);
    for (p, mode) in &m {
        if p.is_dir() {
            kinds.0 += 1;
            assert_eq!(*mode, 0o700, "{}", p.display());
        } else {
            kinds.1 += 1;
            assert_eq!(*mode, 0o600, "{}", p.display());
        }
    }
    assert!(
        m.contains_key(&dir.join("CHECKPOINT"))
            && m.contains_key(&dir.join("LOCK"))
            && m.keys().any(|p| p.extension().is_some_and(|e| e == "wal"))
            && m.keys()
                .any(|p| p.starts_with(dir.join("sled")) && p.is_file()),
        "the walk must see every kind of journal file: {m:?}"
    );
    assert!(kinds.0 >= 3 && kinds.1 >= 4, "{m:?}");
}

fn commit_some(j: &Journal, from: u32) {
    for i in from..from + 5 {
        let mut b = Batch::new();
        b.put_attachment(&attachment(i, 1));
        j.commit(b).expect("commit");
    }
}

#[test]
fn a_new_journal_is_private() {
    no_umask();
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("state").join("journal");
    let j = Journal::open(&dir).expect("open");
    commit_some(&j, 0);
    j.checkpoint().expect("checkpoint");
    commit_some(&j, 100);
    assert_private(&dir);
    j.close().expect("close");
    assert_private(&dir);
    // Parents are not the journal's: they keep the default mode.
    assert_eq!(mode(&parent.path().join("state")), 0o777);
}

#[test]
fn opening_tightens_a_loose_journal_but_read_only_changes_nothing() {
    no_umask();
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("journal");
    let j = Journal::open(&dir).expect("open");
    commit_some(&j, 0);
    j.abandon();
    // What an earlier build left behind under umask 022.
    for (p, _) in modes(&dir) {
        let loose = if p.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(loose)).expect("chmod");
    }
    let loose = modes(&dir);

    let ro = Journal::open_with(
        &dir,
        JournalOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .expect("read-only open");
    assert_eq!(ro.attachments().expect("read").len(), 5);
    drop(ro);
    let mut after_ro = modes(&dir);
    // sled may create files of its own when it opens.
    after_ro.retain(|p, _| loose.contains_key(p));
    assert_eq!(after_ro, loose, "a read-only open must not chmod");

    let j = Journal::open(&dir).expect("open");
    assert_private(&dir);
    assert_eq!(j.attachments().expect("read").len(), 5);
    j.close().expect("close");
    assert_private(&dir);
}
