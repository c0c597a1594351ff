//! driver.rs's cases with coild as a driver of the node machine
//! (`--engine machine`, cli/src/coild/daemon/engine.rs): the same
//! requests, kills, reboots and store outages, the same expectations, so
//! the two engines are held to one behaviour.

mod fakekube;
mod simkit;

const ENGINE: coil_cli::coild::EngineChoice = coil_cli::coild::EngineChoice::Machine;

include!("driver_cases/cases.rs");

/// The machine's clock at work in coild: emptied blocks above the minimum
/// are withdrawn from table 119 and only then given back to the store, a
/// route deleted by hand is put back within a tick, and what stays leased
/// is what table 119 publishes.
#[test]
fn ticks_release_idle_blocks_after_their_withdrawal_and_repair_table_119() {
    let n = Node::new();
    let mut cfg = simkit::inproc_config(n.dir.path(), "driver-node");
    cfg.engine = ENGINE;
    cfg.resync_interval = Duration::from_millis(50);
    // Blocks of 4 addresses: six pods need two blocks.
    let spec = PoolSpec::new("default", vec!["10.47.0.0/28".parse().expect("net")], 2);
    let (rt, d, journal) =
        simkit::start_inproc(cfg, n.kernel.clone(), Some(spec)).expect("coild starts");
    let run = Run {
        rt: Some(rt),
        d: Some(d),
        journal: Some(journal),
    };
    let leases = || {
        let d = run.d().clone();
        let mut v: Vec<IpAddrNet> =
            block_on(
                &run,
                async move { d.store().node_blocks("driver-node").await },
            )
            .expect("leases")
            .into_iter()
            .map(|l| l.block)
            .collect();
        v.sort();
        v
    };
    let table = || {
        let mut v = block_on(&run, n.kernel.exported_blocks()).expect("table");
        v.sort();
        v
    };
    let mut pods = Vec::new();
    for i in 0..6 {
        let p = n.pod(&format!("t{i}"));
        ips(&run.call("ADD", &format!("t{i}"), Some(&p), ""));
        pods.push(p);
    }
    assert_eq!(leases().len(), 2);
    wait_for(|| table() == leases(), "table 119 publishing both blocks");
    // A route deleted by hand comes back.
    let gone = leases()[0];
    block_on(&run, n.kernel.withdraw_block(gone)).expect("withdraw");
    wait_for(|| table().contains(&gone), "the deleted route put back");
    for (i, p) in pods.iter().enumerate() {
        assert!(run.call("DEL", &format!("t{i}"), Some(p), "").ok);
    }
    // One block stays (the minimum); the other is withdrawn and released.
    wait_for(|| leases().len() == 1, "an idle block released");
    wait_for(|| table() == leases(), "table 119 equal to the leases");
    assert_eq!(run.d().stats()["blocks"], 1, "{}", run.d().stats());
}
