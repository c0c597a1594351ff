//! The seeded in-process fault schedule (see simkit/mod.rs for what it
//! does and checks): a budget of it on every `cargo test`;
//! `COIL_SIM_SEED=N` replays one seed, `COIL_SIM_STEPS=N` runs longer.

mod simkit;

#[test]
fn seeded_runs_keep_every_invariant() {
    let steps: u64 = std::env::var("COIL_SIM_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seeds: Vec<u64> = match std::env::var("COIL_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => vec![1, 2, 3, 4],
    };
    for seed in seeds {
        let (n, kills) = simkit::run(seed, steps);
        eprintln!("seed {seed}: {n} steps, {kills} kills/reboots, no violation");
        assert!(kills > 0, "seed {seed}: the schedule never killed coild");
    }
}
