//! Store writes whose answer is lost (the store applied them, then the
//! request timed out), on coild's own paths. A block release must not put
//! the block back in service (the store may already have given it to
//! another node); an acquisition must not leak the lease it may have
//! made. Both were found by the cluster simulator (coil-sim) in the node
//! machine first.

mod simkit;

use coil::cni::{parse_request, Response};
use coil::journal::LeaseState;
use coil::kernel_mem::MemKernel;
use coil::store::PoolSpec;
use ipnet::IpNet;
use simkit::{answer_ips, inproc_config, start_inproc_with, D};

fn call(rt: &tokio::runtime::Runtime, d: &std::sync::Arc<D>, cmd: &str, cid: &str) -> Response {
    let netns = format!("/run/netns/{cid}");
    let env = [
        ("CNI_COMMAND", cmd.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
        ("CNI_CONTAINERID", cid.to_string()),
        ("CNI_NETNS", netns),
    ];
    let req = parse_request(
        |k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
        br#"{"cniVersion":"1.1.0","name":"k8s","type":"coil"}"#,
    )
    .expect("request");
    let d = d.clone();
    rt.block_on(async move { d.handle(req).await })
}

#[test]
fn a_release_whose_answer_is_lost_keeps_the_block_out_of_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("boot_id"), "boot-1\n").expect("boot id");
    let kernel = MemKernel::default();
    let mut cfg = inproc_config(dir.path(), "rel-node");
    cfg.min_blocks = 0;
    let pool = PoolSpec {
        name: "default".into(),
        subnets: vec!["10.61.0.0/28".parse().expect("net")],
        block_size: 2,
        ipv6_block_size: None,
    };
    let (rt, d, journal) =
        start_inproc_with(cfg, kernel.clone(), Some(pool), Default::default(), Some(7))
            .expect("coild");
    kernel.add_netns("/run/netns/p1");
    let a = answer_ips(&call(&rt, &d, "ADD", "p1"));
    let block: IpNet = IpNet::new(a[0], 30).expect("block").trunc();
    assert!(call(&rt, &d, "DEL", "p1").ok);
    // The unwire runs after the DEL's answer: wait for it.
    for _ in 0..200 {
        if kernel.link_names().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Idle for two passes, then released: the store applies the release
    // but its answer is lost.
    *d.store_backend().lose_answer.lock().expect("lock") = Some("release block".into());
    rt.block_on(d.release_idle_blocks_gated());
    rt.block_on(d.release_idle_blocks_gated());
    assert!(
        d.store_backend()
            .lose_answer
            .lock()
            .expect("lock")
            .is_none(),
        "no release was attempted"
    );
    let store_has = |b: IpNet| {
        let d = d.clone();
        rt.block_on(async move { d.store().block(b).await })
            .expect("store read")
            .1
            .is_some()
    };
    assert!(!store_has(block), "the release was applied in the store");
    // The journal must not call the block leased and usable...
    let lease = journal.lease(block).expect("journal read");
    assert!(
        lease.as_ref().is_none_or(|l| l.state != LeaseState::Leased),
        "a block the store gave up is back in service: {lease:?}"
    );
    // ... so a new pod gets an address from a block the store gives it.
    kernel.add_netns("/run/netns/p2");
    let b = answer_ips(&call(&rt, &d, "ADD", "p2"));
    let nb: IpNet = IpNet::new(b[0], 30).expect("block").trunc();
    assert!(
        store_has(nb),
        "p2's address {:?} is in a block the store does not give",
        b
    );
    // Recovery then settles the release.
    rt.block_on(d.recover(false, false, false))
        .expect("recover");
    let l = journal.lease(block).expect("journal read");
    assert!(
        block == nb || l.is_none(),
        "the half-released block is still in the journal: {l:?}"
    );
    drop(d);
    drop(journal);
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
}

#[test]
fn an_acquisition_whose_answer_is_lost_is_adopted_not_leaked() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("boot_id"), "boot-1\n").expect("boot id");
    let kernel = MemKernel::default();
    let cfg = inproc_config(dir.path(), "acq-node");
    let pool = PoolSpec {
        name: "default".into(),
        subnets: vec!["10.62.0.0/28".parse().expect("net")],
        block_size: 2,
        ipv6_block_size: None,
    };
    let (rt, d, journal) =
        start_inproc_with(cfg, kernel.clone(), Some(pool), Default::default(), Some(9))
            .expect("coild");
    *d.store_backend().lose_answer.lock().expect("lock") = Some("acquire block".into());
    kernel.add_netns("/run/netns/p1");
    let r = call(&rt, &d, "ADD", "p1");
    assert!(!r.ok, "the ADD must fail: {}", r.stdout);
    assert_eq!(r.stdout["code"], 11, "{}", r.stdout);
    let store_blocks = || {
        let d = d.clone();
        rt.block_on(async move { d.store().node_blocks("acq-node").await })
            .expect("store read")
            .into_iter()
            .map(|l| l.block)
            .collect::<Vec<_>>()
    };
    assert_eq!(store_blocks().len(), 1, "the acquisition was applied");
    // A resync adopts the lease the journal lacks.
    rt.block_on(d.recover(false, false, false))
        .expect("recover");
    let held = store_blocks();
    let lease = journal.lease(held[0]).expect("journal read");
    assert!(
        lease
            .as_ref()
            .is_some_and(|l| l.state == LeaseState::Leased),
        "the store's lease of this node is not in its journal: {lease:?}"
    );
    // The retried ADD is served from it: no second block, none leaked.
    let a = answer_ips(&call(&rt, &d, "ADD", "p1"));
    assert_eq!(store_blocks(), held, "a second block was leased");
    assert!(held[0].contains(&a[0]));
    drop(d);
    drop(journal);
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
}
