//! The cluster simulator on every `cargo test`: a budget of seeds, the
//! seeds that once found a bug, and the determinism a replay needs.

use std::collections::BTreeSet;
use std::time::Instant;

use coil_sim::{reduce, run};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A budget of seeds (COIL_SIM_CLUSTER_SEEDS x COIL_SIM_CLUSTER_STEPS);
/// `scripts/sim --cluster --long` and `scripts/bench sim` run millions.
#[test]
fn a_budget_of_seeds_breaks_no_invariant() {
    let seeds = env("COIL_SIM_CLUSTER_SEEDS", 6);
    let steps = env("COIL_SIM_CLUSTER_STEPS", 15_000);
    let first = env("COIL_SIM_CLUSTER_FIRST", 1_000);
    let t0 = Instant::now();
    let mut crashes = 0;
    for seed in first..first + seeds {
        let r = run(seed, steps, None, false);
        if let Some((at, v)) = r.violation {
            panic!(
                "seed {seed} broke an invariant at step {at}: {v}\n\
                 replay: scripts/sim --cluster --seed {seed} --steps {}",
                at + 1
            );
        }
        assert_eq!(r.steps, steps);
        crashes += r.crashes;
    }
    eprintln!(
        "{} steps, {crashes} crash-restarts, 0 violations in {:.1} s",
        seeds * steps,
        t0.elapsed().as_secs_f64()
    );
    // The schedule must crash coild often, or it proves little.
    assert!(crashes >= seeds * steps / 20, "only {crashes} crashes");
}

/// Every seed that found a bug in the node machine while it was written,
/// with the steps it needed (see the commit that added the machine).
#[test]
fn the_seeds_that_found_bugs_stay_fixed() {
    for (seed, steps) in [
        (1, 20_000),
        (2, 3_160),
        (4, 20_000),
        (7, 13_386),
        (38, 20_000),
        (60, 12_684),
        (220, 27_904),
        // Runtimes retrying ADDs: a rebuilt veth's failure released a
        // running pod (96); the rebuild model adopted addressless veths (1).
        (96, 20_001),
        (1, 4_879),
    ] {
        let r = run(seed, steps, None, false);
        assert!(
            r.violation.is_none(),
            "seed {seed} fails again: {:?}",
            r.violation
        );
    }
}

/// A seed replays exactly: same steps, crashes and trace.
#[test]
fn a_seed_replays_exactly() {
    let a = run(77, 3_000, None, true);
    let b = run(77, 3_000, None, true);
    assert_eq!(a.crashes, b.crashes);
    assert_eq!(a.trace, b.trace);
    assert!(!a.trace.is_empty());
    let c = run(78, 3_000, None, true);
    assert_ne!(a.trace, c.trace, "two seeds gave one schedule");
    // Leaving steps out changes only those steps: the rest draw from
    // generators of their own.
    let only: BTreeSet<u64> = (0..3_000).filter(|i| i % 2 == 0).collect();
    let d = run(77, 3_000, Some(&only), true);
    assert_eq!(d.steps, 1_500);
    // An empty reduction budget keeps the whole schedule.
    let kept = reduce(77, 10, std::time::Duration::ZERO);
    assert_eq!(kept.len(), 11);
}
