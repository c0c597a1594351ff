//! The fault schedule has teeth: with a bug planted in coild (see
//! `coil::planted`), the same schedule that passes on the real code must
//! find it within a bounded number of steps, and report it as the
//! violation that bug causes. One test, one bug at a time: a planted bug
//! is process-wide.

mod simkit;

use coil::planted::{clear, plant, Bug};

/// Runs seeds 1..=`seeds` of `steps` steps until one reports a violation;
/// returns (seed, message).
fn first_violation(seeds: u64, steps: u64) -> Option<(u64, String)> {
    for seed in 1..=seeds {
        if let Err(p) = std::panic::catch_unwind(|| simkit::run(seed, steps)) {
            return Some((seed, simkit::panic_message(p.as_ref())));
        }
    }
    None
}

#[test]
fn every_planted_bug_is_found() {
    let symptoms: [(Bug, &[&str]); 2] = [
        // The address is handed to a new pod while the old attachment,
        // still being torn down, holds it: two attachments list it, or
        // (after a crash) the journal's address index names the other.
        (
            Bug::ReuseWhileTearingDown,
            &["is in two attachments", "which the address index gives to"],
        ),
        // A crash between the early wiring and the journal leaves an
        // address on an interface the journal does not know; the next
        // ADD gets it too.
        (Bug::WireBeforeIntent, &["is on two live veths"]),
    ];
    for (bug, symptom) in symptoms {
        clear();
        plant(bug);
        let t = std::time::Instant::now();
        let (seed, msg) = first_violation(10, 3_000)
            .unwrap_or_else(|| panic!("{bug:?} went unnoticed for 10 seeds of 3,000 steps"));
        eprintln!(
            "{bug:?} found with seed {seed} in {:?}: {}",
            t.elapsed(),
            msg.lines().next().unwrap_or("")
        );
        assert!(
            symptom.iter().any(|s| msg.contains(s)),
            "{bug:?} found, but as: {msg}"
        );
        // The failing schedule shrinks to a shorter one that fails the
        // same way, and that one replays.
        let failed_at = msg
            .split(" step ")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .and_then(|i| i.trim().parse::<u64>().ok())
            .expect("the violation names its step");
        let (kept, reduced) = simkit::reduce(
            seed,
            3_000,
            |m| symptom.iter().any(|s| m.contains(s)),
            std::time::Duration::from_secs(15),
        )
        .expect("the schedule fails again");
        eprintln!(
            "{bug:?}: {} steps reduced to {}:\n{reduced}",
            failed_at + 1,
            kept.len()
        );
        assert!(
            (kept.len() as u64) < failed_at + 1,
            "{bug:?}: nothing could be left out of {} steps",
            failed_at + 1
        );
        let only: std::collections::BTreeSet<u64> = kept.iter().copied().collect();
        let replay = std::panic::catch_unwind(|| simkit::run_only(seed, 3_000, Some(&only)));
        let again =
            simkit::panic_message(replay.expect_err("the reduced schedule replays").as_ref());
        assert!(symptom.iter().any(|s| again.contains(s)), "{again}");
    }
    clear();
}
