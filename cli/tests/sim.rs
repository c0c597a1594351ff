//! The seeded in-process fault schedule (see simkit/mod.rs for what it
//! does and checks): a budget of it on every `cargo test`.
//!
//! Knobs (scripts/sim sets them): `COIL_SIM_SEED=N` replays one seed,
//! `COIL_SIM_SEEDS=N` runs seeds 1..=N, `COIL_SIM_STEPS=N` steps per seed;
//! `COIL_SIM_SUMMARY=1` writes sim.steps, sim.crashes, sim.violations and
//! sim.steps_per_s to the bench summary (scripts/bench sim).

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
    for seed in seeds {
        match std::panic::catch_unwind(|| simkit::run(seed, steps)) {
            Ok((n, kills)) => {
                eprintln!(
                    "seed {seed}: {n} steps, {kills} kills, crashes and reboots, no violation"
                );
                assert!(kills > 0, "seed {seed}: the schedule never killed coild");
                total += n;
                crashes += kills;
            }
            Err(p) => {
                violations += 1;
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
            ("sim.steps".into(), total as f64, "steps"),
            (
                "sim.crashes".into(),
                crashes as f64,
                "kills, crashes and reboots",
            ),
            (
                "sim.violations".into(),
                violations as f64,
                "seeds that broke an invariant",
            ),
            ("sim.steps_per_s".into(), total as f64 / secs, "steps/s"),
        ])
        .expect("summary");
    }
    if let Some(p) = first_failure {
        std::panic::resume_unwind(p);
    }
}
