//! The fault schedule has teeth: with a bug planted in coild (see
//! `coil::planted`), the same schedule that passes on the real code must
//! find it, within a bounded number of steps. Its own process, since a
//! planted bug is process-wide.

mod simkit;

use coil::planted::{plant, Bug};

#[test]
fn a_reused_address_whose_veth_is_still_there_is_found() {
    plant(Bug::ReuseWhileTearingDown);
    let budget = 2_000;
    let mut found = None;
    for seed in 1..=5u64 {
        let r = std::panic::catch_unwind(|| simkit::run(seed, budget));
        if let Err(p) = r {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            found = Some((seed, msg));
            break;
        }
    }
    let (seed, msg) = found.expect("the planted bug went unnoticed for 5 seeds of 2,000 steps");
    eprintln!("planted bug found with seed {seed}: {msg}");
    assert!(
        msg.contains("is in two attachments") || msg.contains("is on two live veths"),
        "found, but not as a double assignment: {msg}"
    );
}
