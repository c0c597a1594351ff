//! driver.rs's cases with coild as a driver of the node machine
//! (`--engine machine`, cli/src/coild/daemon/engine.rs): the same
//! requests, kills, reboots and store outages, the same expectations, so
//! the two engines are held to one behaviour.

mod fakekube;
mod simkit;

const ENGINE: coil_cli::coild::EngineChoice = coil_cli::coild::EngineChoice::Machine;

include!("driver_cases/cases.rs");

/// coild on `n` with the machine's clock ticking every 50 ms, and a pool
/// `default` of `subnet` in blocks of 2^`bits` addresses.
fn ticking(n: &Node, subnet: &str, bits: u8) -> Run {
    let mut cfg = simkit::inproc_config(n.dir.path(), "driver-node");
    cfg.engine = ENGINE;
    cfg.resync_interval = Duration::from_millis(50);
    let spec = PoolSpec::new("default", vec![subnet.parse().expect("net")], bits);
    let (rt, d, journal) =
        simkit::start_inproc(cfg, n.kernel.clone(), Some(spec)).expect("coild starts");
    Run {
        rt: Some(rt),
        d: Some(d),
        journal: Some(journal),
    }
}

/// The machine's clock at work in coild: emptied blocks above the minimum
/// are withdrawn from table 119 and only then given back to the store, a
/// route deleted by hand is put back within a tick, and what stays leased
/// is what table 119 publishes.
#[test]
fn ticks_release_idle_blocks_after_their_withdrawal_and_repair_table_119() {
    let n = Node::new();
    // Blocks of 4 addresses: six pods need two blocks.
    let run = ticking(&n, "10.47.0.0/28", 2);
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

/// What the machine's ticks see of the pods' kernel state: a veth deleted
/// by hand under a running pod is rebuilt with the same address, and a pod
/// whose netns is gone without a DEL is released, its address free again.
#[test]
fn ticks_rebuild_a_deleted_veth_and_release_a_pod_whose_netns_is_gone() {
    let n = Node::new();
    let run = ticking(&n, "10.48.0.0/29", 3);
    let pa = n.pod("pa");
    let a = ips(&run.call("ADD", "pa", Some(&pa), ""));
    let pb = n.pod("pb");
    let b = ips(&run.call("ADD", "pb", Some(&pb), ""));
    let veth_a =
        coil::node::host_veth_name(&coil::journal::AttachmentKey::new("k8s", "pa", "eth0"));
    assert!(n.kernel.drop_link(&veth_a));
    wait_for(
        || n.kernel.pod_addresses(&pa, "eth0") == Some(a.clone()),
        "pa's veth rebuilt with its address",
    );
    assert!(run.call("CHECK", "pa", Some(&pa), "").ok);
    // pb's netns goes without a DEL: its attachment is released.
    n.kernel.remove_netns(&pb);
    wait_for(
        || run.d().stats()["attachments"] == 1,
        "pb released once its netns was gone",
    );
    // Its address is free again: the block (8 addresses, pa holds one)
    // hands out seven more.
    let mut got = Vec::new();
    for i in 0..7 {
        let p = n.pod(&format!("q{i}"));
        let r = run.call("ADD", &format!("q{i}"), Some(&p), "");
        if !r.ok {
            break;
        }
        got.extend(ips(&r));
    }
    assert!(got.contains(&b[0]), "{b:?} never handed out again: {got:?}");
    assert!(!got.contains(&a[0]), "pa's address handed out twice");
}

/// coild on `n` with `engine`, over the journal a previous run left.
fn start_engine(n: &Node, engine: coil_cli::coild::EngineChoice, pool: Option<&str>) -> Run {
    let mut cfg = simkit::inproc_config(n.dir.path(), "driver-node");
    cfg.engine = engine;
    let spec = pool.map(|p| PoolSpec::new("default", vec![p.parse().expect("net")], 2));
    let (rt, d, journal) = simkit::start_inproc(cfg, n.kernel.clone(), spec).expect("coild starts");
    Run {
        rt: Some(rt),
        d: Some(d),
        journal: Some(journal),
    }
}

/// Both engines keep one journal format: an operator can switch engines
/// with a restart (docs/operations.md) and back, and the pods of either
/// stay served, checked and deletable, with no address given twice.
#[test]
fn engines_switch_on_one_journal_both_ways() {
    use coil_cli::coild::EngineChoice::{Direct, Machine};
    let n = Node::new();
    type Held = std::collections::BTreeMap<String, (String, Vec<IpAddr>)>;
    // A new pod `cid`: its netns and the addresses its ADD got.
    let add = |run: &Run, held: &mut Held, cid: &str| {
        let p = n.pod(cid);
        let got = ips(&run.call("ADD", cid, Some(&p), ""));
        held.insert(cid.to_string(), (p, got));
    };
    let mut run = start_engine(&n, Direct, Some("10.48.0.0/28"));
    let mut held = Held::new();
    for cid in ["s0", "s1", "s2"] {
        add(&run, &mut held, cid);
    }
    let (p1, _) = held.remove("s1").expect("s1");
    ok(&run.call("DEL", "s1", Some(&p1), ""));
    wait_links(&n.kernel, 2);
    run.kill();

    let check_all = |run: &Run, held: &Held| {
        assert_eq!(
            run.d().stats()["attachments"],
            held.len(),
            "{}",
            run.d().stats()
        );
        for (cid, (p, addrs)) in held {
            ok(&run.call("CHECK", cid, Some(p), ""));
            // A repeated ADD answers what the other engine gave.
            assert_eq!(&ips(&run.call("ADD", cid, Some(p), "")), addrs, "{cid}");
        }
        let given: BTreeSet<IpAddr> = held.values().flat_map(|(_, a)| a.clone()).collect();
        assert_eq!(
            given.len(),
            held.values().map(|(_, a)| a.len()).sum::<usize>(),
            "an address given twice: {held:?}"
        );
    };

    // The machine engine takes over the direct engine's journal.
    let mut run = start_engine(&n, Machine, None);
    check_all(&run, &held);
    add(&run, &mut held, "s3");
    check_all(&run, &held);
    let (p0, _) = held.remove("s0").expect("s0");
    ok(&run.call("DEL", "s0", Some(&p0), ""));
    wait_links(&n.kernel, 2);
    run.kill();

    // And back.
    let run = start_engine(&n, Direct, None);
    check_all(&run, &held);
    add(&run, &mut held, "s4");
    check_all(&run, &held);
    for (cid, (p, _)) in std::mem::take(&mut held) {
        ok(&run.call("DEL", &cid, Some(&p), ""));
    }
    wait_links(&n.kernel, 0);
    wait_for(
        || run.d().stats()["attachments"] == 0,
        "every attachment released",
    );
}

/// What a kill leaves between the links of a fresh reservation and its
/// durable record (an addressless veth no record owns) is found by the
/// machine's own scan at the restart, with no recovery run: the started
/// coild has removed it, and the pods it does own are untouched.
#[test]
fn a_restart_scans_away_the_links_of_a_reservation_that_never_became_durable() {
    let n = Node::new();
    let mut run = n.start(&["10.49.0.0/28"]);
    let pa = n.pod("pa");
    let got = ips(&run.call("ADD", "pa", Some(&pa), ""));
    // The links of pod pb's ADD, made while its batch synced; then kill.
    let pb = n.pod("pb");
    let spec = unrecorded_links(&n, &run, "pb", &pb, "10.49.0.9");
    assert_eq!(n.kernel.link_names().len(), 2);
    run.kill();
    let run = n.start(&[]);
    assert_eq!(
        n.kernel.link_names().len(),
        1,
        "{:?}",
        n.kernel.link_names()
    );
    assert!(!n.kernel.link_names().contains(&spec.host_veth));
    assert_eq!(n.kernel.pod_addresses(&pa, "eth0"), Some(got));
    ok(&run.call("CHECK", "pa", Some(&pa), ""));
    // The runtime's retried ADD of pb wires it from scratch.
    let b = ips(&run.call("ADD", "pb", Some(&pb), ""));
    assert_eq!(n.kernel.pod_addresses(&pb, "eth0"), Some(b));
}

/// A running coild's clock scans the kernel every tenth tick: a coil link
/// that no record owns (with coil's alias) goes, a foreign link that only
/// looks like coil's (no alias) stays, and so do the pods' veths.
#[test]
fn ticks_scan_away_coil_links_no_record_owns() {
    let n = Node::new();
    let run = ticking(&n, "10.50.0.0/28", 2);
    let pa = n.pod("pa");
    let got = ips(&run.call("ADD", "pa", Some(&pa), ""));
    let spec = unrecorded_links(&n, &run, "ghost", &n.pod("ghost"), "10.50.0.9");
    let foreign = coil::kernel::WireSpec {
        host_veth: "coilforeign01".into(),
        alias: "not-coil".into(),
        netns: n.pod("foreign"),
        ..spec.clone()
    };
    block_on(&run, n.kernel.prepare_in(&foreign, None)).expect("links");
    wait_for(
        || !n.kernel.link_names().contains(&spec.host_veth),
        "the scan to remove the unowned link",
    );
    let links = n.kernel.link_names();
    assert!(links.contains(&foreign.host_veth), "{links:?}");
    assert_eq!(links.len(), 2, "{links:?}");
    assert_eq!(n.kernel.pod_addresses(&pa, "eth0"), Some(got));
}
