//! Power-cut test: the kill -9 test of crash.rs, on a filesystem that
//! forgets what was not fsynced (coil-lazyfs, FUSE).
//!
//! The supervisor mounts coil-lazyfs and re-executes this test binary as a
//! child that opens the journal on it and commits from four threads (group
//! commit; checkpoints every 32 KiB, so they run all the time), printing an
//! acknowledgement after each commit returns. Each run then cuts power:
//!
//! * at a chosen step (most runs): a trip makes the filesystem fail that
//!   operation and every later one, as if the machine died just before it:
//!   a sled write, a sled file or directory fsync, the create, write, fsync
//!   or rename of CHECKPOINT.tmp, the fsync of the journal directory, the
//!   deletion of a covered segment, the WAL directory fsync, a segment
//!   creation, a WAL write or fdatasync;
//! * or at a random moment (the others), sometimes while the child is still
//!   opening and replaying;
//!
//! then kills the child (SIGKILL), makes the filesystem forget everything
//! unsynced (tearing each file's last unsynced write at a random point in
//! half of the cuts, keeping a random half of the unsynced operations in a
//! fifth), sometimes remounts it over the same backing directory, reopens
//! the journal (no repair) and checks that:
//!
//! * every acknowledged put is present and intact, every acknowledged
//!   delete absent;
//! * the batch each thread may have had in flight is wholly visible or
//!   wholly absent;
//! * nothing else is visible, every record decodes, `verify` is clean.
//!
//! `COIL_POWERCUT_CUTS` (default 200) and `COIL_POWERCUT_SEED` (printed)
//! set the number of cuts and replay a run (the cut points and options
//! replay; the moments the child reaches them depend on scheduling);
//! `COIL_POWERCUT_TRACE=1` prints per-run timings. Skipped (with a message) where
//! FUSE cannot be mounted, unless `COIL_REQUIRE_FUSE=1`. With
//! `COIL_BENCH_SUMMARY` set (scripts/bench powerloss) it writes
//! `journal.powerloss.cuts` and `journal.powerloss.lost` there.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use coil_journal::*;
use coil_lazyfs::{CutOptions, CutReport, Mount, OpKind, Trip};
use rand::{Rng, SeedableRng};

const THREADS: u32 = 4;
const CHILD_ENV: &str = "COIL_POWERCUT_CHILD_DIR";

fn key(run: u32, t: u32, i: u32) -> AttachmentKey {
    common::run_key(run, t, i)
}

fn record(run: u32, t: u32, i: u32) -> Attachment {
    common::run_record(run, t, i, "powercut")
}

/// Each commit of a thread from the fourth on also deletes the thread's
/// record from three commits earlier, in the same batch (so the journal
/// stays small and each check stays fast, while checkpoints carry deletes).
fn deletes(i: u32) -> Option<u32> {
    i.checked_sub(3)
}

fn child_opts() -> JournalOptions {
    JournalOptions {
        // Small, so cuts land inside checkpoints and segment rotation.
        checkpoint_bytes: 32 * 1024,
        ..Default::default()
    }
}

/// The child: not a test of its own; the supervisor runs it with --ignored.
#[test]
#[ignore = "entry point of the power-cut child process, run by powercut_supervisor"]
fn powercut_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let run: u32 = std::env::var("COIL_POWERCUT_RUN")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("COIL_POWERCUT_RUN");
    let j = match Journal::open_with(&dir, child_opts()) {
        Ok(j) => std::sync::Arc::new(j),
        Err(e) => {
            // Legitimate only if a trip failed the filesystem under it.
            println!("\nopen-failed {e}");
            return;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "\nready").expect("ack");
        out.flush().expect("ack");
    }
    let started = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                // Bounded: the supervisor kills us long before either limit.
                for i in 0..20_000u32 {
                    if started.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                    let mut b = Batch::new();
                    b.put_attachment(&record(run, t, i));
                    if let Some(d) = deletes(i) {
                        b.delete_attachment(&key(run, t, d));
                    }
                    // After a trip every commit fails (and only then may
                    // one: the supervisor checks).
                    if let Err(e) = j.commit(b) {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "\ncommit-failed {e}");
                        let _ = out.flush();
                        return;
                    }
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{t} {i}").expect("ack");
                    out.flush().expect("ack");
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    // No clean close: the supervisor kills us.
    std::thread::sleep(Duration::from_secs(30));
}

/// Where a run cuts power.
#[derive(Debug, Clone, Copy)]
struct Step {
    label: &'static str,
    op: OpKind,
    path: &'static str,
    max_skip: u32,
    /// Part of a checkpoint (sled writes and syncs, CHECKPOINT, segment
    /// deletion).
    checkpoint: bool,
}

const STEPS: &[Step] = &[
    Step {
        label: "sled write",
        op: OpKind::Write,
        path: "/j/sled/",
        max_skip: 40,
        checkpoint: true,
    },
    Step {
        label: "sled file fsync",
        op: OpKind::Fsync,
        path: "/j/sled/",
        max_skip: 4,
        checkpoint: true,
    },
    Step {
        label: "sled dir fsync",
        op: OpKind::FsyncDir,
        path: "/j/sled",
        max_skip: 2,
        checkpoint: true,
    },
    Step {
        label: "CHECKPOINT.tmp create",
        op: OpKind::Create,
        path: "/j/CHECKPOINT.tmp",
        max_skip: 1,
        checkpoint: true,
    },
    Step {
        label: "CHECKPOINT.tmp write",
        op: OpKind::Write,
        path: "/j/CHECKPOINT.tmp",
        max_skip: 1,
        checkpoint: true,
    },
    Step {
        label: "CHECKPOINT.tmp fsync",
        op: OpKind::Fsync,
        path: "/j/CHECKPOINT.tmp",
        max_skip: 1,
        checkpoint: true,
    },
    Step {
        label: "CHECKPOINT rename",
        op: OpKind::Rename,
        path: "/j/CHECKPOINT.tmp -> /j/CHECKPOINT",
        max_skip: 1,
        checkpoint: true,
    },
    Step {
        label: "journal dir fsync",
        op: OpKind::FsyncDir,
        path: "/j$",
        max_skip: 1,
        checkpoint: true,
    },
    Step {
        label: "segment delete",
        op: OpKind::Unlink,
        path: "/j/wal/",
        max_skip: 1,
        checkpoint: true,
    },
    Step {
        label: "wal dir fsync",
        op: OpKind::FsyncDir,
        path: "/j/wal$",
        max_skip: 3,
        checkpoint: false,
    },
    Step {
        label: "segment create",
        op: OpKind::Create,
        path: "/j/wal/",
        max_skip: 2,
        checkpoint: false,
    },
    Step {
        label: "wal fdatasync",
        op: OpKind::Fsync,
        path: "/j/wal/",
        max_skip: 60,
        checkpoint: false,
    },
    Step {
        label: "wal write",
        op: OpKind::Write,
        path: "/j/wal/",
        max_skip: 120,
        checkpoint: false,
    },
];

#[derive(Default)]
struct Expect {
    /// Acknowledged and not deleted: must be present.
    live: BTreeSet<AttachmentKey>,
    /// Acknowledged deleted: must be absent.
    gone: BTreeSet<AttachmentKey>,
}

struct Child {
    proc: std::process::Child,
    reader: Option<std::thread::JoinHandle<()>>,
    rx: mpsc::Receiver<String>,
}

impl Drop for Child {
    /// Also when the supervisor panics: no child outlives the test and
    /// pins the mount.
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

fn spawn_child(dir: &Path, run: u32) -> Child {
    let exe = std::env::current_exe().expect("current exe");
    let mut proc = Command::new(exe)
        .args([
            "--exact",
            "powercut_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env("COIL_POWERCUT_RUN", run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = proc.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Child {
        proc,
        reader: Some(reader),
        rx,
    }
}

/// Kills the child and returns its acknowledgements, and the failures it
/// reported (open or commit).
fn kill_child(mut c: Child) -> (Vec<(u32, u32)>, Vec<String>) {
    // SIGKILL: no destructor, no final checkpoint.
    let _ = c.proc.kill();
    let _ = c.proc.wait();
    if let Some(r) = c.reader.take() {
        r.join().expect("reader");
    }
    let mut failures = Vec::new();
    let acks =
        c.rx.try_iter()
            .filter_map(|l| {
                if l.starts_with("open-failed ") || l.starts_with("commit-failed ") {
                    failures.push(l);
                    return None;
                }
                let mut it = l.split_whitespace();
                let t = it.next()?.parse().ok()?;
                let i = it.next()?.parse().ok()?;
                Some((t, i))
            })
            .collect();
    (acks, failures)
}

fn parse(k: &AttachmentKey) -> (u32, u32, u32) {
    let parts: Vec<&str> = k.container_id.split('-').collect();
    let num = |s: &str| s[1..].parse::<u32>().expect("number");
    (num(parts[0]), num(parts[1]), num(parts[2]))
}

fn summary_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/summary.json")
}

/// A timed cut landed inside a checkpoint if it dropped sled data or a
/// CHECKPOINT file operation.
fn inside_checkpoint(r: &CutReport) -> bool {
    r.files
        .iter()
        .any(|f| f.path.starts_with("/j/sled/") || f.path.starts_with("/j/CHECKPOINT"))
        || r.dropped_ns
            .iter()
            .chain(&r.kept_ns)
            .any(|n| n.contains("/j/CHECKPOINT") || n.contains("unlink /j/wal/"))
}

#[test]
fn powercut_supervisor() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let cuts: u32 = std::env::var("COIL_POWERCUT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("COIL_POWERCUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let tmp = tempfile::tempdir().expect("tempdir");
    let backing = tmp.path().join("backing");
    let mut mnt = tmp.path().join("mnt");
    let mut fs = match Mount::new(&backing, &mnt) {
        Ok(m) => m,
        Err(e) if std::env::var("COIL_REQUIRE_FUSE").as_deref() != Ok("1") => {
            eprintln!("powercut_supervisor SKIPPED: cannot mount FUSE ({e}); COIL_REQUIRE_FUSE=1 makes this fail");
            return;
        }
        Err(e) => panic!("mount lazyfs: {e}"),
    };
    eprintln!("powercut_supervisor: {cuts} cuts, COIL_POWERCUT_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Per-run timings on stderr.
    let trace = std::env::var_os("COIL_POWERCUT_TRACE").is_some();
    let mut dir = mnt.join("j");
    let started = Instant::now();
    let mut expect = Expect::default();
    let mut acked_total = 0usize;
    let mut torn_tails = 0usize;
    let mut in_flight_landed = 0usize;
    let mut by_step: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut in_checkpoint = 0u32;
    let mut missed_trips = 0u32;
    let mut remounts = 0u32;
    let mut lost = 0usize;
    let (mut child_time, mut check_time) = (Duration::ZERO, Duration::ZERO);

    for run in 0..cuts {
        let step = if rng.gen_bool(0.7) {
            Some(STEPS[rng.gen_range(0..STEPS.len())])
        } else {
            None
        };
        let before_ready = step.is_none() && rng.gen_bool(0.15);
        let t_run = Instant::now();
        let child = spawn_child(&dir, run);
        let label: &'static str = match step {
            Some(s) => {
                let skip = rng.gen_range(0..=s.max_skip);
                fs.arm(Trip {
                    op: s.op,
                    path_contains: s.path.into(),
                    skip,
                });
                // Bounded wait for the trip; if it never fires (the child
                // did not get that far), cut anyway.
                let deadline = Instant::now() + Duration::from_millis(1500);
                while fs.tripped().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if fs.tripped().is_some() {
                    s.label
                } else {
                    missed_trips += 1;
                    "timed (trip missed)"
                }
            }
            None => {
                if !before_ready {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match child.rx.recv_timeout(left) {
                            Ok(l) if l == "ready" => break,
                            Ok(l) if l.starts_with("open-failed") => {
                                panic!("seed {seed} run {run}: child: {l}")
                            }
                            Ok(_) => {}
                            Err(_) => panic!("seed {seed} run {run}: child never became ready"),
                        }
                    }
                }
                std::thread::sleep(Duration::from_micros(rng.gen_range(0..30_000)));
                if before_ready {
                    "timed, while opening"
                } else {
                    "timed"
                }
            }
        };
        let (acks, failures) = kill_child(child);
        // Read after the kill: a trip may fire until the child is dead.
        let tripped = fs.tripped().is_some();
        assert!(
            tripped || failures.is_empty(),
            "seed {seed} run {run}: the child failed, and no trip failed the \
             filesystem under it: {failures:?}"
        );
        let t_child = t_run.elapsed();
        let opts = CutOptions {
            seed: rng.gen(),
            keep_prob: if rng.gen_bool(0.2) { 0.5 } else { 0.0 },
            tear_last: rng.gen_bool(0.5),
        };
        let t0 = Instant::now();
        let report = fs.cut(opts).expect("cut");
        if trace {
            eprintln!("run {run}: cut {:?}", t0.elapsed());
        }
        let is_ckpt =
            step.is_some_and(|s| s.checkpoint && label == s.label) || inside_checkpoint(&report);
        if is_ckpt {
            in_checkpoint += 1;
        }
        *by_step.entry(label).or_default() += 1;
        if run % 10 == 9 {
            // Serve the same backing directory again, at a new mountpoint
            // (see Mount::detach).
            let t0 = Instant::now();
            fs.detach();
            let t1 = t0.elapsed();
            remounts += 1;
            mnt = tmp.path().join(format!("mnt{remounts}"));
            dir = mnt.join("j");
            fs = Mount::new(&backing, &mnt).expect("remount");
            if trace {
                eprintln!("run {run}: unmount {t1:?}, remount {:?}", t0.elapsed() - t1);
            }
        }
        let ctx = format!("seed {seed} run {run} cut at {label} ({opts:?}):\n{report}");

        acked_total += acks.len();
        let mut last: BTreeMap<u32, u32> = BTreeMap::new();
        for (t, i) in acks {
            let k = key(run, t, i);
            expect.gone.remove(&k);
            expect.live.insert(k);
            if let Some(d) = deletes(i) {
                let dk = key(run, t, d);
                expect.live.remove(&dk);
                expect.gone.insert(dk);
            }
            let e = last.entry(t).or_insert(i);
            *e = (*e).max(i);
        }

        let t0 = Instant::now();
        let j = Journal::open(&dir)
            .unwrap_or_else(|e| panic!("{ctx}\nreopen after the power cut: {e}"));
        if trace {
            eprintln!("run {run}: open {:?}", t0.elapsed());
        }
        torn_tails += j.open_report().torn_tails.len();
        let present: BTreeMap<AttachmentKey, Attachment> = j
            .attachments()
            .unwrap_or_else(|e| panic!("{ctx}\ntorn record visible: {e}"))
            .into_iter()
            .map(|a| (a.key.clone(), a))
            .collect();

        let mut in_flight: BTreeMap<AttachmentKey, Option<AttachmentKey>> = BTreeMap::new();
        for t in 0..THREADS {
            let i = last.get(&t).map_or(0, |i| i + 1);
            in_flight.insert(key(run, t, i), deletes(i).map(|d| key(run, t, d)));
        }
        for (k, del) in &in_flight {
            let landed = present.contains_key(k);
            if let Some(d) = del {
                assert_eq!(
                    !landed,
                    present.contains_key(d),
                    "{ctx}\nhalf of batch {k} is visible"
                );
                if landed {
                    expect.live.remove(d);
                    expect.gone.insert(d.clone());
                }
            }
            if landed {
                in_flight_landed += 1;
                expect.live.insert(k.clone());
            }
        }
        let missing: Vec<&AttachmentKey> = expect
            .live
            .iter()
            .filter(|k| !present.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            lost += missing.len();
            write_summary(run + 1, lost);
            panic!(
                "{ctx}\n{} acknowledged records lost, first {}",
                missing.len(),
                missing[0]
            );
        }
        for k in &expect.live {
            let (r, t, i) = parse(k);
            assert_eq!(present.get(k), Some(&record(r, t, i)), "{ctx}\n{k} altered");
        }
        for k in &expect.gone {
            assert!(!present.contains_key(k), "{ctx}\ndeleted {k} came back");
        }
        assert_eq!(
            present.len(),
            expect.live.len(),
            "{ctx}\nrecords present that were never acknowledged"
        );
        let t0 = Instant::now();
        let v = j.verify();
        if trace {
            eprintln!("run {run}: verify {:?}", t0.elapsed());
        }
        assert!(v.corrupt.is_empty(), "{ctx}\n{:?}", v.corrupt);
        // Alternate clean and crash-like closes of the supervisor's own open.
        let t0 = Instant::now();
        if run % 2 == 0 {
            j.close().expect("close");
        } else {
            j.abandon();
        }
        if trace {
            eprintln!("run {run}: close {:?}", t0.elapsed());
            eprintln!("run {run}: child {t_child:?} total {:?}", t_run.elapsed());
        }
        child_time += t_child;
        check_time += t_run.elapsed() - t_child;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "powercut_supervisor: {cuts} cuts in {secs:.1} s ({in_checkpoint} inside a checkpoint, \
         {missed_trips} trips missed, {remounts} remounts), {acked_total} acknowledged commits, \
         {} live records, {in_flight_landed} unacknowledged batches landed whole, \
         {torn_tails} torn tails cut, 0 lost; {:.1} s in children, {:.1} s cutting and checking",
        expect.live.len(),
        child_time.as_secs_f64(),
        check_time.as_secs_f64()
    );
    for (label, n) in &by_step {
        eprintln!("  {n:4}  cut at {label}");
    }
    write_summary(cuts, lost);
    assert!(
        acked_total > cuts as usize,
        "the children committed too little to test anything"
    );
    assert!(
        in_checkpoint >= cuts / 10,
        "only {in_checkpoint} of {cuts} cuts landed inside a checkpoint"
    );
    drop(fs);
}

fn write_summary(cuts: u32, lost: usize) {
    if std::env::var_os("COIL_BENCH_SUMMARY").is_none() {
        return;
    }
    match coil_lazyfs::write_bench_summary(
        &summary_path(),
        &[
            ("journal.powerloss.cuts", f64::from(cuts), "cuts"),
            ("journal.powerloss.lost", lost as f64, "commits"),
        ],
    ) {
        Ok(p) => eprintln!("powercut_supervisor: wrote {}", p.display()),
        Err(e) => eprintln!("powercut_supervisor: bench summary: {e}"),
    }
}

/// Regression: found by `powercut_supervisor` (COIL_POWERCUT_SEED=
/// 13347463479425396526, run 2): the journal created its directory (and
/// missing parents) without fsyncing their parents, so a power cut after
/// the first acknowledged commits could lose the directory entry, hence
/// the whole journal.
#[test]
fn a_new_journal_survives_a_power_cut_right_after_its_first_commit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    let fs = match Mount::new(&backing, &mnt) {
        Ok(m) => m,
        Err(e) if std::env::var("COIL_REQUIRE_FUSE").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: cannot mount FUSE ({e}); COIL_REQUIRE_FUSE=1 makes this fail");
            return;
        }
        Err(e) => panic!("mount lazyfs: {e}"),
    };
    // A missing parent too: coild's state directory on a fresh node.
    let dir = mnt.join("state").join("journal");
    let j = Journal::open(&dir).expect("open");
    let mut b = Batch::new();
    b.put_attachment(&record(0, 0, 0));
    j.commit(b).expect("commit");
    j.abandon();
    let report = fs.cut(CutOptions::forget()).expect("cut");
    let j = reopen(&dir).unwrap_or_else(|e| panic!("reopen: {e}\n{report}"));
    assert_eq!(
        j.attachment(&key(0, 0, 0)).expect("read"),
        Some(record(0, 0, 0)),
        "the acknowledged commit is lost; the cut:\n{report}"
    );
    j.close().expect("close");
}

/// Regression: found by `powercut_supervisor` (COIL_POWERCUT_SEED=
/// 16591230208655485387, run 252: a cut before sled fsynced a snapshot it
/// was generating, whose create survived and whose data did not). sled
/// 0.34 takes the newest `snap.*` file for its snapshot, including an
/// unfinished `snap.*.generating` (it only skips `.in___motion`), and
/// refuses to open when that file is torn or empty: the journal could not
/// open without `coilctl node repair --rebuild`. A kill -9 between sled's
/// create and write of that file leaves the same. The journal now removes
/// unfinished snapshots before it opens sled.
#[test]
fn an_unfinished_sled_snapshot_does_not_stop_the_journal_from_opening() {
    for (name, bytes) in [
        ("snap.00000000FFFFFFFF.generating", Vec::new()),
        ("snap.00000000FFFFFFFF.generating", {
            let mut v = vec![0u8; 7832];
            v.extend([1, 2, 3, 4]);
            v
        }),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("j");
        let j = Journal::open(&dir).expect("open");
        for i in 0..50 {
            let mut b = Batch::new();
            b.put_attachment(&record(1, 0, i));
            j.commit(b).expect("commit");
        }
        j.close().expect("close");
        std::fs::write(dir.join("sled").join(name), &bytes).expect("write snapshot");
        let j = Journal::open(&dir).unwrap_or_else(|e| {
            panic!(
                "open with an unfinished sled snapshot ({} bytes): {e}",
                bytes.len()
            )
        });
        assert_eq!(j.attachments().expect("read").len(), 50);
        assert!(!dir.join("sled").join(name).exists());
        j.close().expect("close");
    }
}

/// Opens a journal that was just abandoned in this process. Its lock may
/// still be held for a moment by a child another test of this binary is
/// spawning: a fork copies every descriptor, the lock file's too, until
/// the child's exec closes it (CLOEXEC). Retried briefly on Locked, only.
fn reopen(dir: &Path) -> Result<Journal, coil_journal::JournalError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match Journal::open(dir) {
            Err(coil_journal::JournalError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

fn mount_or_skip(backing: &Path, mnt: &Path) -> Option<Mount> {
    match Mount::new(backing, mnt) {
        Ok(m) => Some(m),
        Err(e) if std::env::var("COIL_REQUIRE_FUSE").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: cannot mount FUSE ({e}); COIL_REQUIRE_FUSE=1 makes this fail");
            None
        }
        Err(e) => panic!("mount lazyfs: {e}"),
    }
}

/// Deferred commits (the ADD's Wired record) under power cuts: whatever
/// survives is a prefix of the commit order (never a later frame without an
/// earlier one), every commit that waited for its sync survives, and a
/// deferred commit followed by a synced one survives with it.
#[test]
fn deferred_commits_survive_a_power_cut_as_a_prefix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    let Some(fs) = mount_or_skip(&backing, &mnt) else {
        return;
    };
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for run in 0..20u32 {
        let dir = mnt.join(format!("j{run}"));
        let j = Journal::open(&dir).expect("open");
        let n = rng.gen_range(1..40u32);
        let mut last_synced: Option<u32> = None;
        for i in 0..n {
            let mut b = Batch::new();
            b.put_attachment(&record(run, 0, i));
            if rng.gen_bool(0.7) {
                j.commit_deferred(b).expect("deferred commit");
            } else {
                j.commit(b).expect("commit");
                last_synced = Some(i);
            }
        }
        j.abandon();
        let report = fs.cut(CutOptions::forget()).expect("cut");
        let j = reopen(&dir).unwrap_or_else(|e| panic!("seed {seed} run {run}: reopen: {e}"));
        let present: Vec<u32> = (0..n)
            .filter(|i| j.attachment(&key(run, 0, *i)).expect("read").is_some())
            .collect();
        let prefix: Vec<u32> = (0..present.len() as u32).collect();
        assert_eq!(
            present, prefix,
            "seed {seed} run {run}: the surviving commits are not a prefix\n{report}"
        );
        if let Some(s) = last_synced {
            assert!(
                present.len() as u32 > s,
                "seed {seed} run {run}: commit {s} waited for its sync and is lost\n{report}"
            );
        }
        j.close().expect("close");
    }
}

/// A deferred commit becomes durable by itself (the journal's syncer
/// thread), without a later commit to carry it.
#[test]
fn a_deferred_commit_is_synced_without_another_commit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    let Some(fs) = mount_or_skip(&backing, &mnt) else {
        return;
    };
    let dir = mnt.join("j");
    let j = Journal::open(&dir).expect("open");
    let before = j.stats().syncs;
    let mut b = Batch::new();
    b.put_attachment(&record(0, 0, 1));
    j.commit_deferred(b).expect("deferred commit");
    let deadline = Instant::now() + Duration::from_secs(5);
    while j.stats().syncs == before {
        assert!(
            Instant::now() < deadline,
            "the deferred commit was never synced"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    j.abandon();
    let report = fs.cut(CutOptions::forget()).expect("cut");
    let j = reopen(&dir).expect("reopen");
    assert_eq!(
        j.attachment(&key(0, 0, 1)).expect("read"),
        Some(record(0, 0, 1)),
        "a synced deferred commit is lost\n{report}"
    );
    j.close().expect("close");
}
