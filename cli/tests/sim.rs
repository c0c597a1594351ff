//! The seeded in-process fault schedule (see simkit/mod.rs for what it
//! does and checks): a budget of it on every `cargo test`.
//!
//! Knobs (scripts/sim sets them): `COIL_SIM_SEED=N` replays one seed,
//! `COIL_SIM_SEEDS=N` runs seeds 1..=N, `COIL_SIM_STEPS=N` steps per seed;
//! `COIL_SIM_SUMMARY=1` writes sim.daemon.steps, .crashes, .violations and
//! .steps_per_s to the bench summary (scripts/bench sim).
//! `COIL_SIM_ONLY=3,17,42` runs only those steps of the seed's schedule
//! (a reduced trace's replay); `COIL_SIM_REDUCE=SECS` shrinks the first
//! failing schedule for up to SECS seconds and prints the shortest trace
//! found.

mod simkit;

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

#[test]
fn seeded_runs_keep_every_invariant() {
    let steps = env_u64("COIL_SIM_STEPS").unwrap_or(400);
    let seeds: Vec<u64> = match env_u64("COIL_SIM_SEED") {
        Some(s) => vec![s],
        None => (1..=env_u64("COIL_SIM_SEEDS").unwrap_or(4)).collect(),
    };
    let summary = std::env::var("COIL_SIM_SUMMARY").is_ok_and(|v| v == "1");
    let t = std::time::Instant::now();
    let (mut total, mut crashes, mut violations) = (0u64, 0u64, 0u64);
    let mut first_failure = None;
    let only: Option<std::collections::BTreeSet<u64>> = std::env::var("COIL_SIM_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    let mut failed_seed = None;
    for seed in seeds {
        match std::panic::catch_unwind(|| simkit::run_only(seed, steps, only.as_ref())) {
            Ok((n, kills)) => {
                eprintln!(
                    "seed {seed}: {n} steps, {kills} kills, crashes and reboots, no violation"
                );
                assert!(
                    kills > 0 || only.is_some(),
                    "seed {seed}: the schedule never killed coild"
                );
                total += n;
                crashes += kills;
            }
            Err(p) => {
                violations += 1;
                failed_seed.get_or_insert(seed);
                first_failure.get_or_insert(p);
                if !summary {
                    break;
                }
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "sim: {total} steps, {crashes} kills/crashes/reboots, {violations} violating seed(s), {:.0} steps/s",
        total as f64 / secs
    );
    if summary {
        coil_testkit::write_bench_summary(&[
            ("sim.daemon.steps".into(), total as f64, "steps"),
            (
                "sim.daemon.crashes".into(),
                crashes as f64,
                "kills, crashes and reboots",
            ),
            (
                "sim.daemon.violations".into(),
                violations as f64,
                "seeds that broke an invariant",
            ),
            (
                "sim.daemon.steps_per_s".into(),
                total as f64 / secs,
                "steps/s",
            ),
        ])
        .expect("summary");
    }
    if let (Some(seed), Some(secs)) = (failed_seed, env_u64("COIL_SIM_REDUCE")) {
        let budget = std::time::Duration::from_secs(secs);
        if let Some((kept, msg)) = simkit::reduce(seed, steps, |_| true, budget) {
            eprintln!(
                "seed {seed}: reduced to {} step(s) within {secs} s:\n{msg}",
                kept.len()
            );
        }
    }
    if let Some(p) = first_failure {
        std::panic::resume_unwind(p);
    }
}
