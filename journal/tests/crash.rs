//! kill -9 crash test (the sled / raft-engine pattern).
//!
//! The supervisor re-executes this test binary as a child that opens the
//! journal and commits from four threads, printing an acknowledgement line to
//! a pipe after each commit returns. The supervisor SIGKILLs the child at a
//! random moment (sometimes while it is still opening and replaying), reopens
//! the journal and checks that:
//!
//! * every acknowledged put is present and intact, unless acknowledged as deleted;
//! * nothing that was never written is visible, and the one batch per thread
//!   that may have been in flight is either wholly visible or wholly absent;
//! * every record decodes (nothing torn is visible).
//!
//! `COIL_CRASH_KILLS` sets the number of kills (default 200);
//! `COIL_CRASH_SEED` makes a run reproducible.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use coil_journal::*;
use rand::{Rng, SeedableRng};

const THREADS: u32 = 4;
const CHILD_ENV: &str = "COIL_CRASH_CHILD_DIR";

fn key(run: u32, t: u32, i: u32) -> AttachmentKey {
    common::run_key(run, t, i)
}

fn record(run: u32, t: u32, i: u32) -> Attachment {
    common::run_record(run, t, i, "chaos")
}

/// Each fourth commit of a thread also deletes the thread's record from three
/// commits earlier, in the same batch.
fn deletes(i: u32) -> Option<u32> {
    (i % 4 == 3).then(|| i - 3)
}

fn child_opts() -> JournalOptions {
    JournalOptions {
        // Small, so kills also land inside checkpoints and segment rotation.
        checkpoint_bytes: 32 * 1024,
        ..Default::default()
    }
}

/// The child: not a test of its own; the supervisor runs it with --ignored.
#[test]
#[ignore = "entry point of the kill -9 child process, run by kill9_supervisor"]
fn kill9_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let run: u32 = std::env::var("COIL_CRASH_RUN")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("COIL_CRASH_RUN");
    let j = std::sync::Arc::new(Journal::open_with(&dir, child_opts()).expect("child open"));
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
                    j.commit(b).expect("child commit");
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
}

#[derive(Default)]
struct Expect {
    /// Acknowledged and not deleted: must be present.
    live: BTreeSet<AttachmentKey>,
    /// Acknowledged deleted: must be absent.
    gone: BTreeSet<AttachmentKey>,
}

fn run_child(dir: &Path, run: u32, kill_after: Duration, before_ready: bool) -> Vec<(u32, u32)> {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "kill9_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env("COIL_CRASH_RUN", run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    if !before_ready {
        // Wait (bounded) until the child has opened the journal.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l == "ready" => break,
                Ok(_) => {}
                Err(_) => panic!("child of run {run} never became ready"),
            }
        }
    }
    std::thread::sleep(kill_after);
    // SIGKILL: no destructor, no final checkpoint, no flush.
    child.kill().expect("kill child");
    let _ = child.wait();
    reader.join().expect("reader");
    rx.try_iter()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let t = it.next()?.parse().ok()?;
            let i = it.next()?.parse().ok()?;
            Some((t, i))
        })
        .collect()
}

#[test]
fn kill9_supervisor() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let kills: u32 = std::env::var("COIL_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("COIL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("kill9_supervisor: {kills} kills, COIL_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut expect = Expect::default();
    let (mut acked_total, mut torn, mut in_flight_landed) = (0usize, 0usize, 0usize);

    for run in 0..kills {
        let before_ready = rng.gen_bool(0.15);
        let kill_after = Duration::from_micros(if before_ready {
            rng.gen_range(0..20_000)
        } else {
            rng.gen_range(500..40_000)
        });
        let acks = run_child(dir.path(), run, kill_after, before_ready);
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

        let j = Journal::open(dir.path())
            .unwrap_or_else(|e| panic!("seed {seed} run {run}: reopen after kill: {e}"));
        torn += j.open_report().torn_tails.len();
        let present: BTreeMap<AttachmentKey, Attachment> = j
            .attachments()
            .unwrap_or_else(|e| panic!("seed {seed} run {run}: torn record visible: {e}"))
            .into_iter()
            .map(|a| (a.key.clone(), a))
            .collect();

        // The batch each thread may have had in flight: the one after its
        // last acknowledged commit (or its first, if none was acknowledged).
        let mut in_flight: BTreeMap<AttachmentKey, Option<AttachmentKey>> = BTreeMap::new();
        for t in 0..THREADS {
            let i = last.get(&t).map_or(0, |i| i + 1);
            in_flight.insert(key(run, t, i), deletes(i).map(|d| key(run, t, d)));
        }
        for (k, del) in &in_flight {
            let landed = present.contains_key(k);
            if let Some(d) = del {
                // Atomic batches: the put and the delete land together.
                assert_eq!(
                    !landed,
                    present.contains_key(d),
                    "seed {seed} run {run}: half of batch {k} is visible"
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
        for k in &expect.live {
            let got = present
                .get(k)
                .unwrap_or_else(|| panic!("seed {seed} run {run}: acknowledged {k} lost"));
            let (r, t, i) = parse(k);
            assert_eq!(got, &record(r, t, i), "seed {seed} run {run}: {k} altered");
        }
        for k in &expect.gone {
            assert!(
                !present.contains_key(k),
                "seed {seed} run {run}: deleted {k} came back"
            );
        }
        assert_eq!(
            present.len(),
            expect.live.len(),
            "seed {seed} run {run}: records present that were never acknowledged"
        );
        let v = j.verify();
        assert!(
            v.corrupt.is_empty(),
            "seed {seed} run {run}: {:?}",
            v.corrupt
        );
        // Alternate clean and crash-like closes of the supervisor's own open.
        if run % 2 == 0 {
            j.close().expect("close");
        } else {
            j.abandon();
        }
    }
    eprintln!(
        "kill9_supervisor: {kills} kills, {acked_total} acknowledged commits, {} live records, \
         {in_flight_landed} unacknowledged batches landed whole, {torn} torn tails cut",
        expect.live.len()
    );
    assert!(
        acked_total > kills as usize,
        "the children committed too little to test anything"
    );
}

fn parse(k: &AttachmentKey) -> (u32, u32, u32) {
    let parts: Vec<&str> = k.container_id.split('-').collect();
    let num = |s: &str| s[1..].parse::<u32>().expect("number");
    (num(parts[0]), num(parts[1]), num(parts[2]))
}
