//! coil-sim: runs the cluster simulator from the command line.
//!
//! ```text
//! coil-sim [--seed N | --seeds N] [--first N] [--steps N] [--threads N]
//!          [--only I,J,..] [--reduce SECS] [--plant BUG] [--summary]
//! ```
//!
//! Exits 0 when every seed passed, 1 on a violation (after printing the
//! seed, the replay command and the shortest trace found), 2 on bad
//! arguments.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coil::planted::Bug;
use coil_sim::{reduce, run, Report};

const USAGE: &str = "usage: coil-sim [--seed N | --seeds N] [--first N] [--steps N] [--threads N] \
                     [--only I,J,..] [--reduce SECS] [--plant reuse|wire-first|liveness|boot] [--summary]";

#[derive(Debug)]
struct Args {
    first: u64,
    seeds: u64,
    steps: u64,
    threads: u64,
    only: Option<BTreeSet<u64>>,
    reduce: u64,
    plant: Option<Bug>,
    summary: bool,
}

fn num(v: Option<String>, flag: &str) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag}: {v:?} is not a whole number"))
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        first: 1,
        seeds: 4,
        steps: 20_000,
        threads: 1,
        only: None,
        reduce: 30,
        plant: None,
        summary: false,
    };
    while let Some(f) = it.next() {
        match f.as_str() {
            "--seed" => {
                a.first = num(it.next(), "--seed")?;
                a.seeds = 1;
            }
            "--seeds" => a.seeds = num(it.next(), "--seeds")?,
            "--first" => a.first = num(it.next(), "--first")?,
            "--steps" => a.steps = num(it.next(), "--steps")?,
            "--threads" => a.threads = num(it.next(), "--threads")?.max(1),
            "--reduce" => a.reduce = num(it.next(), "--reduce")?,
            "--only" => {
                let v = it.next().ok_or("--only needs a value")?;
                a.only = Some(parse_steps(&v)?);
            }
            "--plant" => {
                a.plant = Some(match it.next().as_deref() {
                    Some("reuse") => Bug::ReuseWhileTearingDown,
                    Some("wire-first") => Bug::WireBeforeIntent,
                    Some("liveness") => Bug::FreeOnLivenessExpiry,
                    Some("boot") => Bug::BootRecordedAtStart,
                    other => return Err(format!("--plant: unknown bug {other:?}")),
                })
            }
            "--summary" => a.summary = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let a = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("coil-sim: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(b) = a.plant {
        coil::planted::plant(b);
    }
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(a.first));
    let last = a.first + a.seeds;
    let failed: Arc<Mutex<Option<Report>>> = Arc::new(Mutex::new(None));
    let totals = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let threads: Vec<_> = (0..a.threads)
        .map(|_| {
            let (next, failed, totals) = (next.clone(), failed.clone(), totals.clone());
            let only = a.only.clone();
            let steps = a.steps;
            std::thread::spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= last || failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let r = run(seed, steps, only.as_ref(), false);
                totals.0.fetch_add(r.steps, Ordering::Relaxed);
                totals.1.fetch_add(r.crashes, Ordering::Relaxed);
                if r.violation.is_some() {
                    if let Ok(mut f) = failed.lock() {
                        if f.as_ref().is_none_or(|x| x.seed > r.seed) {
                            *f = Some(r);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let secs = t0.elapsed().as_secs_f64();
    let steps = totals.0.load(Ordering::Relaxed);
    let crashes = totals.1.load(Ordering::Relaxed);
    let failed = failed.lock().ok().and_then(|f| f.clone());
    let violations = u64::from(failed.is_some());
    println!(
        "coil-sim: {steps} steps, {crashes} crash-restarts, {violations} violations in {secs:.1} s \
         ({:.0} steps/s)",
        steps as f64 / secs.max(1e-9)
    );
    if a.summary {
        let figures = vec![
            ("sim.steps".to_string(), steps as f64, "steps"),
            ("sim.crashes".to_string(), crashes as f64, "crash-restarts"),
            (
                "sim.violations".to_string(),
                violations as f64,
                "violations",
            ),
            (
                "sim.steps_per_s".to_string(),
                steps as f64 / secs.max(1e-9),
                "steps/s",
            ),
            ("sim.seconds".to_string(), secs, "s"),
        ];
        match coil_testkit::write_bench_summary(&figures) {
            Ok(p) => println!("coil-sim: figures written to {}", p.display()),
            Err(e) => eprintln!("coil-sim: writing the summary: {e}"),
        }
    }
    let Some(r) = failed else {
        return ExitCode::SUCCESS;
    };
    let (at, what) = r.violation.clone().unwrap_or_default();
    println!(
        "coil-sim: seed {} broke an invariant at step {at}: {what}",
        r.seed
    );
    let kept = if a.only.is_some() || a.reduce == 0 {
        a.only.clone()
    } else {
        let k = reduce(r.seed, at, Duration::from_secs(a.reduce));
        println!(
            "coil-sim: shortest schedule found keeps {} of {} steps",
            k.len(),
            at + 1
        );
        Some(k)
    };
    let replay = run(r.seed, at + 1, kept.as_ref(), true);
    println!("coil-sim: trace:");
    for l in &replay.trace {
        println!("  {l}");
    }
    if let Some((_, v)) = &replay.violation {
        println!("  => {v}");
    }
    let only = kept
        .map(|k| format!(" --only {}", format_steps(&k)))
        .unwrap_or_default();
    println!(
        "coil-sim: replay: scripts/sim --cluster --seed {} --steps {}{only}{}",
        r.seed,
        at + 1,
        a.plant
            .map(|b| format!(" --plant {}", plant_name(b)))
            .unwrap_or_default()
    );
    ExitCode::from(1)
}

fn plant_name(b: Bug) -> &'static str {
    match b {
        Bug::ReuseWhileTearingDown => "reuse",
        Bug::WireBeforeIntent => "wire-first",
        Bug::FreeOnLivenessExpiry => "liveness",
        Bug::BootRecordedAtStart => "boot",
    }
}

/// Parses `1,4-9,12` into step numbers.
fn parse_steps(v: &str) -> Result<BTreeSet<u64>, String> {
    let mut s = BTreeSet::new();
    for x in v.split(',').filter(|x| !x.is_empty()) {
        let bad = || format!("--only: {x:?} is not a step number or range");
        match x.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if b < a || b - a > 10_000_000 {
                    return Err(bad());
                }
                s.extend(a..=b);
            }
            None => {
                s.insert(x.parse().map_err(|_| bad())?);
            }
        }
    }
    Ok(s)
}

/// Formats step numbers with runs as ranges: `1,4-9,12`.
fn format_steps(k: &BTreeSet<u64>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    for &x in k {
        run = match run {
            Some((a, b)) if x == b + 1 => Some((a, x)),
            Some((a, b)) => {
                parts.push(if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                });
                Some((x, x))
            }
            None => Some((x, x)),
        };
    }
    if let Some((a, b)) = run {
        parts.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    parts.join(",")
}
