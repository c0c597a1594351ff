//! The store contract: every test runs against the etcd adapter (a real
//! etcd server on a private loopback port) and against the embedded
//! adapter (a journal in a temp dir), and both must behave the same.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coil::journal::Journal;
use coil::store::backend::{Op, Txn};
use coil::store::embedded::EmbeddedBackend;
use coil::store::{AddressRecord, Backend, BlockLease, NodeRecord, PoolSpec, Store, StoreError};
use coil_adapters::etcd::{EtcdBackend, EtcdOptions};
use coil_testkit as testkit;
use ipnet::IpNet;

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

fn spec(name: &str, subnets: &[&str], bs: u8) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        subnets: subnets.iter().map(|s| net(s)).collect(),
        block_size: bs,
        ipv6_block_size: None,
    }
}

async fn etcd_store(tag: &str) -> Store<EtcdBackend> {
    let ep = testkit::shared_etcd().expect("etcd for tests");
    let b = EtcdBackend::connect(&EtcdOptions {
        endpoints: vec![ep],
        ..Default::default()
    })
    .await
    .expect("connect");
    Store::open(b, &testkit::unique_prefix(tag))
        .await
        .expect("open")
}

struct Embedded {
    store: Store<EmbeddedBackend>,
    _dir: tempfile::TempDir,
}

async fn embedded_store(_tag: &str) -> Embedded {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path()).expect("journal");
    let b = EmbeddedBackend::open(Arc::new(j)).expect("embedded");
    Embedded {
        store: Store::open(b, "/coil/").await.expect("open"),
        _dir: dir,
    }
}

/// Runs `$body` (an async fn taking `&Store<B>`) against both adapters.
macro_rules! contract {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn etcd() {
                let s = super::etcd_store(stringify!($name)).await;
                super::$name(&s).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() {
                let e = super::embedded_store(stringify!($name)).await;
                super::$name(&e.store).await;
            }
        }
    };
}

/// A snapshot of everything under the store's prefix, to prove that a
/// refused operation changed nothing.
async fn snapshot<B: Backend>(s: &Store<B>) -> Vec<(String, Vec<u8>, i64)> {
    let mut r = s
        .backend()
        .txn("snapshot", Txn::read(vec![Op::prefix(s.keys().prefix())]))
        .await
        .expect("snapshot");
    r.kvs(0)
        .into_iter()
        .map(|kv| (kv.key_str(), kv.value, kv.mod_revision))
        .collect()
}

async fn pool_lifecycle<B: Backend>(s: &Store<B>) {
    let p = s
        .create_pool(&spec("default", &["10.0.0.0/24"], 4))
        .await
        .expect("create");
    assert_eq!(p.total_blocks(), 16);
    assert!(matches!(
        s.create_pool(&spec("default", &["10.9.0.0/24"], 4)).await,
        Err(StoreError::PoolExists(_))
    ));
    let p2 = s
        .add_subnet("default", net("10.0.1.0/26"))
        .await
        .expect("add subnet");
    assert_eq!(p2.subnets, vec![net("10.0.0.0/24"), net("10.0.1.0/26")]);
    assert_eq!(p2.total_blocks(), 20);
    assert!(matches!(
        s.add_subnet("nope", net("10.5.0.0/24")).await,
        Err(StoreError::PoolNotFound(_))
    ));
    let got = s.get_pool("default").await.expect("get").expect("exists");
    assert_eq!(got.subnets, p2.subnets);
    s.create_pool(&spec("team-a", &["10.2.0.0/24"], 5))
        .await
        .expect("create team-a");
    let names: Vec<String> = s
        .list_pools()
        .await
        .expect("list")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, vec!["default".to_string(), "team-a".to_string()]);
    let removed = s.remove_pool("team-a", false).await.expect("remove");
    assert_eq!(removed.blocks_released, 0);
    assert!(s.get_pool("team-a").await.expect("get").is_none());
    assert!(matches!(
        s.remove_pool("team-a", false).await,
        Err(StoreError::PoolNotFound(_))
    ));
    // Its subnet is free again.
    s.create_pool(&spec("team-b", &["10.2.0.0/24"], 5))
        .await
        .expect("subnet reusable after remove");
}
contract!(pool_lifecycle);

async fn overlap_is_refused_and_changes_nothing<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("default", &["10.0.0.0/16"], 5))
        .await
        .expect("create");
    s.create_pool(&spec("v6", &["fd00:10::/104"], 8))
        .await
        .expect("create v6");
    let before = snapshot(s).await;
    for (subnet, existing, bs) in [
        ("10.0.0.0/16", "10.0.0.0/16", 5),
        ("10.0.1.0/24", "10.0.0.0/16", 5),
        ("10.0.0.0/8", "10.0.0.0/16", 12),
        ("10.0.255.0/24", "10.0.0.0/16", 5),
        ("fd00:10::/104", "fd00:10::/104", 8),
        ("fd00:10::10:0/112", "fd00:10::/104", 8),
        ("fd00:10::/96", "fd00:10::/104", 16),
    ] {
        match s.create_pool(&spec("other", &[subnet], bs)).await {
            Err(StoreError::SubnetOverlap {
                subnet: got,
                existing: e,
                ..
            }) => {
                assert_eq!(got, net(subnet));
                assert_eq!(e, net(existing));
            }
            other => panic!("create with {subnet}: expected overlap, got {other:?}"),
        }
        match s.add_subnet("v6", net(subnet)).await {
            Err(StoreError::SubnetOverlap { .. }) | Err(StoreError::Invalid(_)) => {}
            other => panic!("add-subnet {subnet}: expected refusal, got {other:?}"),
        }
    }
    assert_eq!(snapshot(s).await, before, "refusals changed the store");
    // Neighbours that do not overlap are fine.
    s.create_pool(&spec("other", &["10.1.0.0/16"], 5))
        .await
        .expect("adjacent subnet");
    s.add_subnet("v6", net("fd00:11::/104"))
        .await
        .expect("adjacent v6 subnet");
}
contract!(overlap_is_refused_and_changes_nothing);

async fn bad_input_changes_nothing<B: Backend>(s: &Store<B>) {
    let before = snapshot(s).await;
    let cases = [
        spec("Default", &["10.0.0.0/24"], 4),
        spec("a_b", &["10.0.0.0/24"], 4),
        spec("", &["10.0.0.0/24"], 4),
        spec("ok", &[], 4),
        spec("ok", &["10.0.0.0/24"], 25),
        spec("ok", &["10.0.0.0/24"], 9),
        spec("ok", &["10.0.0.0/8"], 2),
        // An IPv6 block size without an IPv6 subnet; an IPv6 block size too
        // big for its subnet.
        PoolSpec {
            ipv6_block_size: Some(4),
            ..spec("ok", &["10.0.0.0/24"], 4)
        },
        PoolSpec {
            ipv6_block_size: Some(9),
            ..spec("ok", &["10.0.0.0/24", "fd00::/120"], 4)
        },
        spec("ok", &["10.0.0.0/24", "10.0.0.128/25"], 4),
        spec("ok", &["fd00::/64"], 40),
    ];
    for c in &cases {
        match s.create_pool(c).await {
            Err(e) if e.is_bad_input() => {}
            other => panic!("{c:?}: expected bad input, got {other:?}"),
        }
    }
    assert!(s.acquire_block("Bad", "n1").await.is_err());
    assert!(s.acquire_block("good", "bad/node").await.is_err());
    assert_eq!(snapshot(s).await, before);
    assert_eq!(s.schema().await.expect("schema"), None, "schema written");
}
contract!(bad_input_changes_nothing);

async fn acquire_release_exhaust<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("default", &["10.8.0.0/26"], 2))
        .await
        .expect("create");
    let mut got: Vec<BlockLease> = Vec::new();
    for i in 0..16 {
        let node = format!("node-{}", i % 3);
        let l = s.acquire_block("default", &node).await.expect("acquire");
        assert_eq!(l.block.prefix_len(), 30);
        assert!(net("10.8.0.0/26").contains(&l.block));
        assert_eq!(l.node, node);
        got.push(l);
    }
    let blocks: HashSet<IpNet> = got.iter().map(|l| l.block).collect();
    assert_eq!(blocks.len(), 16, "a block was leased twice");
    match s.acquire_block("default", "node-0").await {
        Err(StoreError::Exhausted { pool, blocks, .. }) => {
            assert_eq!(pool, "default");
            assert_eq!(blocks, 16);
        }
        other => panic!("expected exhaustion, got {other:?}"),
    }
    let victim = got[0].clone();
    // Fenced by owner.
    let wrong = BlockLease {
        node: "intruder".into(),
        ..victim.clone()
    };
    assert!(matches!(
        s.release_block(&wrong).await,
        Err(StoreError::NotOwner { .. })
    ));
    // Fenced by epoch.
    let stale = BlockLease {
        epoch: victim.epoch - 1,
        ..victim.clone()
    };
    assert!(matches!(
        s.release_block(&stale).await,
        Err(StoreError::StaleEpoch { .. })
    ));
    s.release_block(&victim).await.expect("release");
    assert!(matches!(
        s.release_block(&victim).await,
        Err(StoreError::NotLeased { .. })
    ));
    let again = s
        .acquire_block("default", "node-9")
        .await
        .expect("reacquire");
    assert_eq!(again.block, victim.block, "the only free block");
    assert!(again.epoch > victim.epoch, "epochs grow");
    // The old incarnation can no longer release the new lease.
    let old_owner_again = BlockLease {
        node: "node-9".into(),
        ..victim.clone()
    };
    assert!(matches!(
        s.release_block(&old_owner_again).await,
        Err(StoreError::StaleEpoch { .. })
    ));
    let usage = s.pool_usage("default").await.expect("usage");
    assert_eq!(usage.leases.len(), 16);
    let mine = s.node_blocks("node-9").await.expect("node blocks");
    assert_eq!(mine.len(), 1);
    assert!(matches!(
        s.remove_pool("default", false).await,
        Err(StoreError::PoolInUse { blocks: 16, .. })
    ));
    // An address in use blocks even a forced remove.
    let rec = AddressRecord {
        network: "k8s".into(),
        address: again.block.network(),
        pool: "default".into(),
        block: again.block,
        node: "node-9".into(),
        container_id: "c1".into(),
        ifname: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: "p1".into(),
    };
    s.put_address(&rec).await.expect("index");
    assert!(matches!(
        s.remove_pool("default", true).await,
        Err(StoreError::PoolNotEmpty { addresses: 1, .. })
    ));
    assert!(s.delete_address(&rec).await.expect("unindex"));
    let r = s.remove_pool("default", true).await.expect("force remove");
    assert_eq!(r.blocks_released, 16);
    assert!(s.all_blocks().await.expect("blocks").is_empty());
    assert!(matches!(
        s.acquire_block("default", "node-0").await,
        Err(StoreError::PoolNotFound(_))
    ));
}
contract!(acquire_release_exhaust);

/// 50 nodes acquire concurrently from one pool until it runs dry.
async fn fifty_nodes_concurrently<B: Backend>(s: &Store<B>) {
    // 128 blocks for 50 nodes.
    s.create_pool(&spec("default", &["10.16.0.0/22"], 3))
        .await
        .expect("create");
    let results = futures_join(s, 50).await;
    let mut all = Vec::new();
    for (node, leases, end) in results {
        match end {
            StoreError::Exhausted { blocks: 128, .. } => {}
            other => panic!("{node} stopped with {other}, not exhaustion"),
        }
        all.extend(leases);
    }
    let blocks: HashSet<IpNet> = all.iter().map(|l| l.block).collect();
    assert_eq!(all.len(), 128, "every block leased exactly once");
    assert_eq!(blocks.len(), 128, "no block leased twice");
    let stored = s.all_blocks().await.expect("blocks");
    assert_eq!(stored.len(), 128);
    for l in &all {
        let st = stored
            .iter()
            .find(|x| x.block == l.block)
            .expect("lease stored");
        assert_eq!(st.node, l.node);
        assert_eq!(st.epoch, l.epoch);
    }
    // Releases are fenced by owner: nobody frees another node's block.
    let a = &all[0];
    let other = all.iter().find(|l| l.node != a.node).expect("two nodes");
    let forged = BlockLease {
        node: other.node.clone(),
        ..a.clone()
    };
    assert!(matches!(
        s.release_block(&forged).await,
        Err(StoreError::NotOwner { .. })
    ));
    for l in &all {
        s.release_block(l).await.expect("owner release");
    }
    assert!(s.all_blocks().await.expect("blocks").is_empty());
}
contract!(fifty_nodes_concurrently);

async fn futures_join<B: Backend>(
    s: &Store<B>,
    n: usize,
) -> Vec<(String, Vec<BlockLease>, StoreError)> {
    let tasks = (0..n).map(|i| async move {
        let node = format!("node-{i:02}");
        let mut mine = Vec::new();
        loop {
            match s.acquire_block("default", &node).await {
                Ok(l) => mine.push(l),
                Err(e) => return (node, mine, e),
            }
            // The embedded backend never yields on its own; interleave the
            // nodes as a real cluster would.
            tokio::task::yield_now().await;
            if mine.len() > 200 {
                return (node, mine, StoreError::Invalid("runaway".into()));
            }
        }
    });
    join_all(tasks).await
}

/// A minimal join_all (the tests do not need the futures crate).
async fn join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<std::pin::Pin<Box<F>>> = fs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in pending.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("finished")).collect()
}

async fn liveness_expires<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("default", &["10.20.0.0/24"], 4))
        .await
        .expect("create");
    let rec = |n: &str| NodeRecord {
        node: n.into(),
        boot_id: format!("boot-{n}"),
        started_unix: 1,
        version: "test".into(),
    };
    let short = s.register_node(&rec("short"), 2).await.expect("register");
    let long = s.register_node(&rec("long"), 60).await.expect("register");
    let b = s.acquire_block("default", "short").await.expect("acquire");
    s.acquire_block("default", "ghost").await.expect("acquire");
    let nodes = s.nodes().await.expect("nodes");
    let find = |ns: &[coil::store::NodeStatus], n: &str| {
        ns.iter().find(|x| x.node == n).cloned().expect("listed")
    };
    assert!(find(&nodes, "short").alive);
    assert_eq!(find(&nodes, "short").blocks, 1);
    assert!(find(&nodes, "long").alive);
    assert!(!find(&nodes, "ghost").alive, "no liveness key: dead");
    assert!(s.keep_alive(short).await.expect("keepalive"));
    // Refused while alive.
    assert!(matches!(
        s.admin_release("short", b.block, false).await,
        Err(StoreError::NodeAlive { .. })
    ));
    // Stop heartbeating "short"; it must show as dead within a bound.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ns = s.nodes().await.expect("nodes");
        if !find(&ns, "short").alive {
            assert_eq!(find(&ns, "short").blocks, 1, "blocks outlive liveness");
            assert!(find(&ns, "long").alive);
            break;
        }
        assert!(Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!s.keep_alive(short).await.expect("keepalive"), "expired");
    let released = s
        .admin_release("short", b.block, false)
        .await
        .expect("dead node's block");
    assert_eq!(released.block, b.block);
    s.deregister_node(long).await.expect("deregister");
    assert!(s.node("long").await.expect("node").is_none());
}
contract!(liveness_expires);

async fn address_index<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("v6", &["fd00:20::/112"], 8))
        .await
        .expect("create");
    let l = s.acquire_block("v6", "n1").await.expect("acquire");
    assert_eq!(l.block.prefix_len(), 120);
    let addr: IpAddr = match l.block {
        IpNet::V6(n) => IpAddr::V6(n.hosts().nth(5).expect("host")),
        IpNet::V4(_) => panic!("v6 pool gave a v4 block"),
    };
    let rec = AddressRecord {
        network: "k8s".into(),
        address: addr,
        pool: "v6".into(),
        block: l.block,
        node: "n1".into(),
        container_id: "abc".into(),
        ifname: "eth0".into(),
        pod_namespace: "v6".into(),
        pod_name: "web".into(),
    };
    s.put_address(&rec).await.expect("index");
    let info = s.address_info(addr).await.expect("info");
    assert_eq!(info.pool.as_deref(), Some("v6"));
    assert_eq!(info.block, Some(l.block));
    assert_eq!(info.lease.as_ref().map(|x| x.node.as_str()), Some("n1"));
    assert_eq!(info.record.as_ref(), Some(&rec));
    assert_eq!(s.addresses_in(&l.block).await.expect("in").len(), 1);
    // A delete for an older assignment leaves the newer one alone.
    let older = AddressRecord {
        container_id: "old".into(),
        ..rec.clone()
    };
    assert!(!s.delete_address(&older).await.expect("fenced"));
    assert!(s.address_info(addr).await.expect("info").record.is_some());
    // A put replaces a valid entry (a newer assignment wins) and is
    // idempotent.
    let newer = AddressRecord {
        container_id: "newer".into(),
        ..rec.clone()
    };
    s.put_address(&newer).await.expect("replace");
    s.put_address(&newer).await.expect("again");
    assert_eq!(
        s.address_info(addr).await.expect("info").record.as_ref(),
        Some(&newer)
    );
    s.put_address(&rec).await.expect("back");
    // Releasing the block drops its index entries.
    s.release_block(&l).await.expect("release");
    assert!(s.address_info(addr).await.expect("info").record.is_none());
    let outside = s
        .address_info("192.0.2.1".parse().expect("ip"))
        .await
        .expect("info");
    assert!(outside.pool.is_none() && outside.record.is_none());
    let bad = AddressRecord {
        address: "fd00:99::1".parse().expect("ip"),
        ..rec
    };
    assert!(s.put_address(&bad).await.is_err());
}
contract!(address_index);

async fn newer_schema_is_refused<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("default", &["10.30.0.0/24"], 4))
        .await
        .expect("create");
    assert_eq!(s.schema().await.expect("schema"), Some(1));
    s.backend()
        .txn(
            "test",
            Txn::read(vec![Op::put(
                s.keys().schema(),
                br#"{"version":2}"#.to_vec(),
            )]),
        )
        .await
        .expect("write");
    assert!(matches!(
        s.schema().await,
        Err(StoreError::SchemaTooNew { found: 2, .. })
    ));
    // Writers are fenced on the exact schema value.
    assert!(s.acquire_block("default", "n1").await.is_err());
    assert!(s.all_blocks().await.expect("blocks").is_empty());
}
contract!(newer_schema_is_refused);

async fn corrupt_entries_are_named<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("default", &["10.0.0.0/24"], 4))
        .await
        .expect("create");
    let key = s.keys().pool("broken");
    put_raw(s, &key, b"{not json").await;
    // A listing skips it and says so; a read of that key names it.
    let names: Vec<String> = s
        .list_pools()
        .await
        .expect("list")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, vec!["default".to_string()]);
    let listed = s.list_pools_checked().await.expect("list");
    assert_eq!(listed.bad.len(), 1);
    assert_eq!(listed.bad[0].key, key);
    match s.get_pool("broken").await {
        Err(StoreError::Corrupt { key: k, reason }) => {
            assert_eq!(k, key);
            assert!(reason.contains("not a valid pool value"), "{reason}");
        }
        other => panic!("expected corrupt, got {other:?}"),
    }
}
contract!(corrupt_entries_are_named);

/// A resync's view: the asked blocks' leases (whoever holds them), nothing
/// of the rest of the cluster, the removal fence, and bad entries skipped.
async fn node_view_reads_only_the_asked_blocks<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("default", &["10.9.0.0/24"], 2))
        .await
        .expect("create");
    let mine = s.acquire_block("default", "node-a").await.expect("acquire");
    let lost = s.acquire_block("default", "node-a").await.expect("acquire");
    let mut taken: HashSet<IpNet> = [mine.block, lost.block].into_iter().collect();
    for _ in 0..10 {
        taken.insert(
            s.acquire_block("default", "node-b")
                .await
                .expect("acquire")
                .block,
        );
    }
    // `lost` now belongs to node-c (released, then taken).
    s.release_block(&lost).await.expect("release");
    let stolen = s
        .acquire_specific("default", lost.block, "node-c")
        .await
        .expect("acquire the freed block");
    // A block of the pool nobody holds.
    let gone: IpNet = (0..64u32)
        .map(|i| net(&format!("10.9.0.{}/30", i * 4)))
        .find(|b| !taken.contains(b))
        .expect("a free block");
    let ask = vec![
        ("default".to_string(), mine.block),
        ("default".to_string(), lost.block),
        ("default".to_string(), gone),
    ];
    let v = s
        .node_view("node-a", &ask)
        .await
        .expect("view")
        .expect("small enough");
    assert!(!v.removed);
    let got: Vec<(IpNet, String)> = v.leases.iter().map(|l| (l.block, l.node.clone())).collect();
    assert_eq!(
        got,
        vec![
            (mine.block, "node-a".to_string()),
            (stolen.block, "node-c".to_string())
        ],
        "the view holds exactly the asked blocks that have an entry"
    );
    // A bad entry under an asked key is skipped (and counted), not fatal.
    let prefix = s.keys().block("default", &gone);
    put_raw(s, &prefix, b"{not json").await;
    let before = s.bad_entries_seen();
    let v = s
        .node_view("node-a", &ask)
        .await
        .expect("view")
        .expect("small");
    assert_eq!(v.leases.len(), 2);
    assert!(s.bad_entries_seen() > before);
    // The fence.
    s.remove_node("node-a", "test", true, None)
        .await
        .expect("remove");
    let v = s
        .node_view("node-a", &ask)
        .await
        .expect("view")
        .expect("small");
    assert!(v.removed);
    // Too many blocks for one transaction: the caller must list instead.
    let many: Vec<(String, IpNet)> = (0..=coil::store::NODE_VIEW_MAX_BLOCKS)
        .map(|i| {
            (
                "default".to_string(),
                net(&format!("10.10.{}.0/30", i % 250)),
            )
        })
        .collect();
    assert!(s.node_view("node-a", &many).await.expect("view").is_none());
}
contract!(node_view_reads_only_the_asked_blocks);

/// The index GC reads the index in pages: one read of 20,000 entries (the
/// index of 20,000 pods) is past gRPC's 4 MiB answers and failed every
/// controller pass (found by `scripts/bench scale` at 1,000 nodes). Across
/// the pages it deletes exactly the entries whose node does not lease
/// their block.
async fn index_gc_pages_through_a_large_index<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("big", &["10.30.0.0/16"], 6))
        .await
        .expect("create");
    let leader = "ctl-pages";
    assert!(s.campaign(leader, 30).await.expect("campaign").is_some());
    let mut blocks = Vec::new();
    for _ in 0..313 {
        blocks.push(s.acquire_block("big", "n1").await.expect("acquire").block);
    }
    let mut batch: Vec<Op> = Vec::new();
    let mut stale = HashSet::new();
    let mut n = 0;
    for (bi, b) in blocks.iter().enumerate() {
        let base = match b.network() {
            IpAddr::V4(a) => u32::from(a),
            IpAddr::V6(_) => unreachable!(),
        };
        for i in 0..64u32 {
            // Every 23rd entry names a node that does not lease the block.
            let node = if (bi as u32 * 64 + i).is_multiple_of(23) {
                "n2"
            } else {
                "n1"
            };
            let rec = AddressRecord {
                network: "k8s".into(),
                address: IpAddr::V4(std::net::Ipv4Addr::from(base + i)),
                pool: "big".into(),
                block: *b,
                node: node.into(),
                container_id: format!("c{bi}-{i}"),
                ifname: "eth0".into(),
                pod_namespace: String::new(),
                pod_name: String::new(),
            };
            if node == "n2" {
                stale.insert(rec.address);
            }
            // Written in batches (as many entries one by one would take
            // long); the values are what put_address writes.
            batch.push(Op::put(
                s.keys().address(rec.address),
                serde_json::to_vec(&rec).expect("json"),
            ));
            if batch.len() == 100 {
                put_batch(s, std::mem::take(&mut batch)).await;
            }
            n += 1;
        }
    }
    put_batch(s, batch).await;
    assert!(n >= 20_000, "the index must outgrow one read");
    let deleted = s.gc_address_index(leader).await.expect("gc");
    assert_eq!(
        deleted,
        stale.len(),
        "exactly the stale entries are deleted"
    );
    for b in &blocks {
        let left = s.addresses_in(b).await.expect("in");
        assert!(left
            .iter()
            .all(|r| r.node == "n1" && !stale.contains(&r.address)));
    }
    assert_eq!(s.gc_address_index(leader).await.expect("gc"), 0);
}
contract!(index_gc_pages_through_a_large_index);

/// A listing of every block answers past gRPC's default 4 MiB (about
/// 30,000 leases, some 15,000 nodes): it must still be read, since a coild
/// start, `node repair` and the controller's pass need it.
async fn a_listing_past_four_mebibytes_is_read<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("wide", &["10.64.0.0/11"], 5))
        .await
        .expect("create");
    let total = 32_000u32;
    let mut batch: Vec<Op> = Vec::new();
    for i in 0..total {
        let block: IpNet = IpNet::new(
            IpAddr::V4(std::net::Ipv4Addr::from(0x0a40_0000u32 + i * 32)),
            27,
        )
        .expect("block");
        let lease = BlockLease {
            pool: "wide".into(),
            block,
            node: format!("node-with-a-long-name-{:05}", i / 2),
            acquired_unix: 1_800_000_000,
            epoch: 0,
        };
        batch.push(Op::put(
            s.keys().block("wide", &block),
            serde_json::to_vec(&lease).expect("json"),
        ));
        if batch.len() == 100 {
            put_batch(s, std::mem::take(&mut batch)).await;
        }
    }
    let all = s.all_blocks().await.expect("list every block");
    assert_eq!(all.len(), total as usize);
    let nodes = s.nodes().await.expect("list nodes");
    assert_eq!(nodes.len(), total as usize / 2);
}
contract!(a_listing_past_four_mebibytes_is_read);

/// Writes raw puts in one transaction (tests that need many entries fast;
/// nothing if `ops` is empty).
async fn dual_stack_pools_lease_each_family_apart<B: Backend>(s: &Store<B>) {
    use coil::store::Family;
    // 4 IPv4 blocks of 4 addresses, 2 IPv6 blocks of 256.
    let p = s
        .create_pool(&PoolSpec {
            name: "dual".into(),
            subnets: vec![net("fd00:77::/119"), net("10.77.0.0/28")],
            block_size: 2,
            ipv6_block_size: Some(8),
        })
        .await
        .expect("create");
    assert_eq!(p.families(), vec![Family::Ipv4, Family::Ipv6]);
    assert_eq!(p.total_blocks(), 6);
    // Read back as it was written.
    let back = s.get_pool("dual").await.expect("get").expect("pool");
    assert_eq!(back.ipv6, p.ipv6);
    // An IPv6 subnet overlapping the dual pool's is refused for another pool.
    assert!(matches!(
        s.create_pool(&spec("other", &["fd00:77::100/120"], 4))
            .await,
        Err(StoreError::SubnetOverlap { .. })
    ));
    let mut v6 = Vec::new();
    for i in 0..2 {
        let l = s
            .acquire_block_of("dual", Some(Family::Ipv6), &format!("n{i}"))
            .await
            .expect("v6 block");
        assert_eq!(l.block.prefix_len(), 120, "{}", l.block);
        assert!(net("fd00:77::/119").contains(&l.block));
        v6.push(l);
    }
    assert_ne!(v6[0].block, v6[1].block);
    // The IPv6 half is exhausted while the IPv4 half has every block free.
    match s.acquire_block_of("dual", Some(Family::Ipv6), "n0").await {
        Err(
            e @ StoreError::Exhausted {
                family: Family::Ipv6,
                blocks: 2,
                ..
            },
        ) => {
            assert!(e.to_string().contains("ipv6"), "{e}");
        }
        other => panic!("expected IPv6 exhaustion, got {other:?}"),
    }
    let mut v4 = Vec::new();
    for i in 0..4 {
        let l = s
            .acquire_block_of("dual", Some(Family::Ipv4), &format!("n{i}"))
            .await
            .expect("v4 block");
        assert_eq!(l.block.prefix_len(), 30);
        v4.push(l);
    }
    assert!(matches!(
        s.acquire_block("dual", "n0").await,
        Err(StoreError::Exhausted {
            family: Family::Ipv4,
            blocks: 4,
            ..
        })
    ));
    // Leases of both families list, release and show per family.
    assert_eq!(s.all_blocks().await.expect("all").len(), 6);
    let cap = s.pool_capacity().await.expect("capacity");
    assert_eq!(
        cap,
        vec![
            ("dual".to_string(), Family::Ipv4, 4, 4),
            ("dual".to_string(), Family::Ipv6, 2, 2)
        ]
    );
    s.release_block(&v6[0]).await.expect("release v6");
    let again = s
        .acquire_block_of("dual", Some(Family::Ipv6), "n9")
        .await
        .expect("freed v6 block");
    assert_eq!(again.block, v6[0].block);
    // The address index takes both families; address info finds each.
    let addr6 = coil::node::address_at(&again.block, 5).expect("address");
    let a6 = AddressRecord {
        address: addr6,
        node: "n9".into(),
        block: again.block,
        pool: "dual".into(),
        network: "k8s".into(),
        container_id: "c1".into(),
        ifname: "eth0".into(),
        pod_namespace: "ns".into(),
        pod_name: "p".into(),
    };
    s.put_address(&a6).await.expect("put v6 address");
    let info = s.address_info(addr6).await.expect("info");
    assert_eq!(info.pool.as_deref(), Some("dual"));
    assert_eq!(info.block, Some(again.block));
    assert_eq!(info.lease.map(|l| l.node), Some("n9".to_string()));
    assert_eq!(info.record, Some(a6));
    // A single-family pool refuses a subnet of the other family, and a
    // dual pool takes one of either.
    s.create_pool(&spec("single", &["10.78.0.0/28"], 2))
        .await
        .expect("single");
    let e = s
        .add_subnet("single", net("fd00:78::/120"))
        .await
        .expect_err("other family without a block size");
    assert!(e.to_string().contains("ipv4 only"), "{e}");
    // With a block size, the other family makes the pool dual-stack; its
    // IPv4 lease stays where it is.
    let before = s.acquire_block("single", "n1").await.expect("v4 lease");
    let e = s
        .add_subnet_with("single", net("fd00:78::/120"), Some(40))
        .await
        .expect_err("block size out of range");
    assert!(e.is_bad_input(), "{e}");
    let dual = s
        .add_subnet_with("single", net("fd00:78::/120"), Some(4))
        .await
        .expect("dual now");
    assert_eq!(dual.families(), vec![Family::Ipv4, Family::Ipv6]);
    assert_eq!(dual.block_size_of(Family::Ipv4), Some(2));
    assert_eq!(dual.block_size_of(Family::Ipv6), Some(4));
    assert_eq!(
        s.node_blocks("n1")
            .await
            .expect("blocks")
            .iter()
            .filter(|l| l.pool == "single")
            .map(|l| l.block)
            .collect::<Vec<_>>(),
        vec![before.block]
    );
    let v6 = s
        .acquire_block_of("single", Some(Family::Ipv6), "n1")
        .await
        .expect("v6 lease");
    assert!(net("fd00:78::/120").contains(&v6.block));
    // A block size for a family the pool has must match it.
    let e = s
        .add_subnet_with("single", net("10.78.1.0/28"), Some(3))
        .await
        .expect_err("mismatched block size");
    assert!(e.to_string().contains("block size 2"), "{e}");
    s.add_subnet_with("single", net("10.78.1.0/28"), Some(2))
        .await
        .expect("matching block size");
    // An IPv6 pool gains an IPv4 half the same way (IPv4 becomes first).
    s.create_pool(&spec("v6only", &["fd00:7a::/120"], 4))
        .await
        .expect("v6 pool");
    let p = s
        .add_subnet_with("v6only", net("10.79.0.0/28"), Some(2))
        .await
        .expect("dual from v6");
    assert_eq!(p.family, Family::Ipv4);
    assert_eq!(p.subnets, vec![net("10.79.0.0/28")]);
    assert_eq!(p.block_size_of(Family::Ipv6), Some(4));
    assert_eq!(p.subnets_of(Family::Ipv6), &[net("fd00:7a::/120")]);
    let grown = s
        .add_subnet("dual", net("fd00:79::/120"))
        .await
        .expect("v6 subnet");
    assert_eq!(grown.family_range(Family::Ipv6).count(), 3);
    assert_eq!(grown.family_range(Family::Ipv4).count(), 4);
    // Nothing the store holds is bad.
    assert_eq!(s.check().await.expect("check"), vec![]);
}
contract!(dual_stack_pools_lease_each_family_apart);

async fn put_batch<B: Backend>(s: &Store<B>, ops: Vec<Op>) {
    if ops.is_empty() {
        return;
    }
    s.backend()
        .txn(
            "test",
            Txn {
                then: ops,
                ..Default::default()
            },
        )
        .await
        .expect("write");
}

async fn put_raw<B: Backend>(s: &Store<B>, key: &str, value: &[u8]) {
    s.backend()
        .txn(
            "test",
            Txn::read(vec![Op::put(key.to_string(), value.to_vec())]),
        )
        .await
        .expect("write");
}

fn lease_json(pool: &str, block: &str, node: &str) -> Vec<u8> {
    serde_json::to_vec(&BlockLease {
        pool: pool.into(),
        block: net(block),
        node: node.into(),
        acquired_unix: 1,
        epoch: 0,
    })
    .expect("json")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// The keys and values of `keys` as they are now (missing keys left out).
async fn entries<B: Backend>(s: &Store<B>, keys: &[String]) -> Vec<(String, Vec<u8>, i64)> {
    snapshot(s)
        .await
        .into_iter()
        .filter(|(k, _, _)| keys.contains(k))
        .collect()
}

/// One of each kind of bad block entry under pool `default`
/// (10.64.0.0/24, blocks of /27: 8 blocks) and a bad pool, bad address and
/// bad node entry; returns the bad block keys.
async fn plant_bad_entries<B: Backend>(s: &Store<B>) -> Vec<String> {
    s.create_pool(&spec("default", &["10.64.0.0/24"], 5))
        .await
        .expect("create default");
    s.create_pool(&spec("other", &["10.65.0.0/24"], 5))
        .await
        .expect("create other");
    let k = s.keys().clone();
    let bkey = |a: &str| k.block("default", &net(&format!("{a}/32")));
    let bad = vec![
        // Not JSON, under a key that names no block.
        (
            format!("{}zz", k.pool_blocks("default")),
            b"garbage".to_vec(),
        ),
        // A real block's key whose value names another pool and block.
        (
            bkey("10.64.0.64"),
            lease_json("other", "10.65.0.0/27", "node-1"),
        ),
        // A real block's key holding garbage.
        (bkey("10.64.0.96"), b"{\"pool\":".to_vec()),
        // A block outside the pool.
        (
            bkey("10.99.0.0"),
            lease_json("default", "10.99.0.0/27", "node-1"),
        ),
        // Everything.
        (
            bkey("0.0.0.0"),
            lease_json("default", "0.0.0.0/0", "node-1"),
        ),
        // Misaligned and of the wrong size.
        (
            bkey("10.64.0.48"),
            lease_json("default", "10.64.0.48/28", "node-1"),
        ),
    ];
    for (key, value) in &bad {
        put_raw(s, key, value).await;
    }
    put_raw(s, &k.pool("broken"), b"{\"name\":\"broken\"}").await;
    // An index entry stored under another address's key.
    let rec = AddressRecord {
        network: "k8s".into(),
        address: ip("10.64.0.34"),
        pool: "default".into(),
        block: net("10.64.0.32/27"),
        node: "node-1".into(),
        container_id: "c1".into(),
        ifname: "eth0".into(),
        pod_namespace: String::new(),
        pod_name: String::new(),
    };
    put_raw(
        s,
        &k.address(ip("10.64.0.33")),
        &serde_json::to_vec(&rec).expect("json"),
    )
    .await;
    put_raw(s, &k.node("node-7"), b"[]").await;
    bad.into_iter().map(|(k, _)| k).collect()
}

async fn bad_entries_are_skipped_reported_and_kept<B: Backend>(s: &Store<B>) {
    let bad_keys = plant_bad_entries(s).await;
    let k = s.keys().clone();
    let good = s
        .acquire_specific("default", net("10.64.0.0/27"), "node-1")
        .await
        .expect("acquire a good lease");
    let all_keys: Vec<String> = snapshot(s).await.into_iter().map(|e| e.0).collect();
    let before = entries(s, &all_keys).await;

    // Listings: the good lease only, and every bad entry reported.
    let seen = s.bad_entries_seen();
    let listed = s.all_blocks_checked().await.expect("blocks");
    assert_eq!(listed.items, vec![good.clone()]);
    let mut reported: Vec<String> = listed.bad.iter().map(|b| b.key.clone()).collect();
    reported.sort();
    let mut want = bad_keys.clone();
    want.sort();
    assert_eq!(reported, want);
    assert_eq!(s.bad_entries_seen(), seen + 6, "each bad entry counted");
    let reason = |key: &str| {
        listed
            .bad
            .iter()
            .find(|b| b.key == key)
            .map(|b| b.reason.clone())
            .unwrap_or_default()
    };
    let bkey = |a: &str| k.block("default", &net(&format!("{a}/32")));
    assert!(reason(&bkey("10.64.0.64")).contains("names pool \"other\""));
    assert!(reason(&bkey("10.64.0.96")).contains("not a valid block lease"));
    assert!(reason(&bkey("10.99.0.0")).contains("outside pool default's subnets"));
    assert!(reason(&bkey("0.0.0.0")).contains("is a /0"));
    assert!(reason(&bkey("10.64.0.48")).contains("is a /28"));

    assert_eq!(s.all_blocks().await.expect("blocks"), vec![good.clone()]);
    assert_eq!(
        s.node_blocks("node-1").await.expect("node blocks"),
        vec![good.clone()]
    );
    assert_eq!(
        s.node_blocks_checked("node-1")
            .await
            .expect("node blocks")
            .bad
            .len(),
        6
    );
    let usage = s.pool_usage("default").await.expect("pool show");
    assert_eq!(usage.leases, vec![good.clone()]);
    assert_eq!(usage.bad.len(), 6);
    let nodes = s.nodes_checked().await.expect("nodes");
    assert_eq!(nodes.items.len(), 1);
    assert_eq!(nodes.items[0].node, "node-1");
    assert_eq!(nodes.items[0].blocks, 1);
    assert!(nodes.bad.iter().any(|b| b.key == k.node("node-7")));
    assert_eq!(nodes.bad.len(), 7);
    let pools = s.list_pools_checked().await.expect("pools");
    assert_eq!(pools.items.len(), 2);
    assert_eq!(pools.bad.len(), 1);
    assert!(matches!(
        s.get_pool("broken").await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        s.node("node-7").await,
        Err(StoreError::Corrupt { .. })
    ));
    let addrs = s
        .addresses_in_checked(&net("10.64.0.32/27"))
        .await
        .expect("addresses");
    assert!(addrs.items.is_empty());
    assert_eq!(addrs.bad.len(), 1);
    assert!(
        addrs.bad[0].reason.contains("names address 10.64.0.34"),
        "{}",
        addrs.bad[0].reason
    );

    // Single-key reads of a bad entry are typed errors naming the key.
    for block in ["10.64.0.64/27", "10.64.0.96/27"] {
        match s.block(net(block)).await {
            Err(StoreError::Corrupt { key, .. }) => {
                assert_eq!(key, k.block("default", &net(block)))
            }
            other => panic!("{block}: expected corrupt, got {other:?}"),
        }
        assert!(matches!(
            s.acquire_specific("default", net(block), "node-1").await,
            Err(StoreError::Corrupt { .. })
        ));
    }
    assert!(matches!(
        s.address_info(ip("10.64.0.33")).await,
        Err(StoreError::Corrupt { .. })
    ));

    // Acquisition never hands out a block whose key is occupied: the 5
    // free blocks, then exhaustion.
    let occupied = [
        net("10.64.0.0/27"),
        net("10.64.0.64/27"),
        net("10.64.0.96/27"),
    ];
    let mut got = HashSet::new();
    for _ in 0..5 {
        let l = s.acquire_block("default", "node-2").await.expect("acquire");
        assert!(!occupied.contains(&l.block), "handed out {}", l.block);
        assert!(got.insert(l.block), "{} twice", l.block);
    }
    assert!(matches!(
        s.acquire_block("default", "node-2").await,
        Err(StoreError::Exhausted { blocks: 8, .. })
    ));

    // Writes around them never touch them.
    let squatter = AddressRecord {
        network: "k8s".into(),
        address: ip("10.64.0.33"),
        pool: "default".into(),
        block: net("10.64.0.32/27"),
        node: "node-2".into(),
        container_id: "c2".into(),
        ifname: "eth0".into(),
        pod_namespace: String::new(),
        pod_name: String::new(),
    };
    assert!(matches!(
        s.put_address(&squatter).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        s.delete_address(&squatter).await,
        Err(StoreError::Corrupt { .. })
    ));
    s.release_block(&good)
        .await
        .expect("release the good lease");
    // (node-2's leases stay: releasing 10.64.0.32/27 would delete its
    // address index range, the bad entry at 10.64.0.33 included.)
    match s.remove_pool("default", false).await {
        Err(StoreError::PoolInUse { blocks, nodes, .. }) => {
            assert_eq!(blocks, 5 + 6);
            assert_eq!(nodes, "node-2, 6 bad entries (coilctl pool show default)");
        }
        other => panic!("expected in use, got {other:?}"),
    }
    // A bad index entry inside the pool counts as an address in use.
    assert!(matches!(
        s.remove_pool("default", true).await,
        Err(StoreError::PoolNotEmpty { addresses: 1, .. })
    ));
    let after = entries(s, &all_keys).await;
    let gone: Vec<&String> = before
        .iter()
        .filter(|e| !after.contains(e))
        .map(|e| &e.0)
        .filter(|key| **key != k.block("default", &good.block))
        .collect();
    assert!(gone.is_empty(), "changed or deleted: {gone:?}");

    // The explicit admin path removes them with the pool, once the
    // administrator has dealt with the bad index entry.
    s.backend()
        .txn(
            "test",
            Txn::read(vec![Op::Delete {
                key: k.address(ip("10.64.0.33")).into_bytes(),
            }]),
        )
        .await
        .expect("delete");
    let r = s.remove_pool("default", true).await.expect("force remove");
    assert_eq!(r.blocks_released, 5 + 6);
    assert!(s.all_blocks_checked().await.expect("blocks").bad.is_empty());
}
contract!(bad_entries_are_skipped_reported_and_kept);

async fn bad_entries_do_not_stop_the_rest<B: Backend>(s: &Store<B>) {
    plant_bad_entries(s).await;
    let k = s.keys().clone();
    // A bad subnet registry entry still counts for overlaps (by its key);
    // it does not stop unrelated pools.
    let reg = k.subnet(&net("10.80.0.0/16"));
    put_raw(s, &reg, b"nonsense").await;
    match s.create_pool(&spec("x", &["10.80.1.0/24"], 5)).await {
        Err(StoreError::SubnetOverlap { existing, pool, .. }) => {
            assert_eq!(existing, net("10.80.0.0/16"));
            assert!(pool.contains(&reg), "{pool}");
        }
        other => panic!("expected overlap, got {other:?}"),
    }
    s.create_pool(&spec("y", &["10.81.0.0/24"], 5))
        .await
        .expect("unrelated pool");
    // A bad pool entry is never overwritten.
    assert!(matches!(
        s.create_pool(&spec("broken", &["10.82.0.0/24"], 5)).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        s.add_subnet("broken", net("10.82.0.0/24")).await,
        Err(StoreError::Corrupt { .. })
    ));

    // The controller's index GC keeps the entries of a pool with bad block
    // entries (one may be their lease) and every bad index entry; it still
    // collects elsewhere.
    let leader = "ctl-1";
    assert!(s.campaign(leader, 30).await.expect("campaign").is_some());
    let unowned = |pool: &str, a: &str, block: &str| AddressRecord {
        network: "k8s".into(),
        address: ip(a),
        pool: pool.into(),
        block: net(block),
        node: "node-5".into(),
        container_id: "c5".into(),
        ifname: "eth0".into(),
        pod_namespace: String::new(),
        pod_name: String::new(),
    };
    let kept = unowned("default", "10.64.0.65", "10.64.0.64/27");
    let collected = unowned("y", "10.81.0.1", "10.81.0.0/27");
    s.put_address(&kept).await.expect("index");
    s.put_address(&collected).await.expect("index");
    assert_eq!(s.gc_address_index(leader).await.expect("gc"), 1);
    let left = snapshot(s).await;
    let has = |key: String| left.iter().any(|e| e.0 == key);
    assert!(has(k.address(kept.address)));
    assert!(!has(k.address(collected.address)));
    assert!(has(k.address(ip("10.64.0.33"))), "bad index entry deleted");

    // Every bad entry of the store, in one report.
    let report = s.check().await.expect("check");
    let keys: Vec<&str> = report.iter().map(|b| b.key.as_str()).collect();
    assert!(keys.contains(&reg.as_str()), "{keys:?}");
    assert!(keys.contains(&k.pool("broken").as_str()));
    assert!(keys.contains(&k.node("node-7").as_str()));
    assert!(keys.contains(&k.address(ip("10.64.0.33")).as_str()));
    assert_eq!(report.len(), 6 + 4, "{report:#?}");
}
contract!(bad_entries_do_not_stop_the_rest);

async fn a_clean_store_checks_clean<B: Backend>(s: &Store<B>) {
    s.create_pool(&spec("default", &["10.90.0.0/24"], 5))
        .await
        .expect("create");
    s.add_subnet("default", net("10.91.0.0/24"))
        .await
        .expect("add");
    let l = s.acquire_block("default", "node-1").await.expect("acquire");
    s.put_address(&AddressRecord {
        network: "k8s".into(),
        address: l.block.network(),
        pool: "default".into(),
        block: l.block,
        node: "node-1".into(),
        container_id: "c".into(),
        ifname: "eth0".into(),
        pod_namespace: String::new(),
        pod_name: String::new(),
    })
    .await
    .expect("index");
    s.register_node(
        &NodeRecord {
            node: "node-1".into(),
            boot_id: "b".into(),
            started_unix: 1,
            version: "0".into(),
        },
        30,
    )
    .await
    .expect("register");
    assert!(s.campaign("ctl", 30).await.expect("campaign").is_some());
    let seen = s.bad_entries_seen();
    assert_eq!(s.check().await.expect("check"), vec![]);
    assert!(s.all_blocks_checked().await.expect("list").bad.is_empty());
    assert_eq!(s.bad_entries_seen(), seen);
}
contract!(a_clean_store_checks_clean);

#[tokio::test]
async fn unreachable_etcd_names_the_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let ep = format!("http://127.0.0.1:{port}");
    let opts = EtcdOptions {
        endpoints: vec![ep.clone()],
        timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let res = match EtcdBackend::connect(&opts).await {
        Err(e) => Err(StoreError::from(e)),
        Ok(b) => Store::open(b, "/coil/").await.map(|_| ()),
    };
    let e = res.expect_err("no etcd there");
    assert!(e.is_unavailable(), "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains(&ep), "{e}");
    assert_eq!(e.exit_code(), coil::exit::UNAVAILABLE);
}

#[tokio::test]
async fn embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = {
        let j = Arc::new(Journal::open(dir.path()).expect("journal"));
        let s = Store::open(EmbeddedBackend::open(j.clone()).expect("b"), "/coil/")
            .await
            .expect("open");
        s.create_pool(&spec("default", &["10.40.0.0/28"], 2))
            .await
            .expect("create");
        let l = s.acquire_block("default", "n1").await.expect("acquire");
        drop(s);
        Arc::try_unwrap(j)
            .expect("sole owner")
            .close()
            .expect("close");
        l
    };
    let j = Arc::new(Journal::open(dir.path()).expect("reopen"));
    let s = Store::open(EmbeddedBackend::open(j).expect("b"), "/coil/")
        .await
        .expect("open");
    let blocks = s.all_blocks().await.expect("blocks");
    assert_eq!(blocks, vec![first.clone()]);
    let second = s.acquire_block("default", "n1").await.expect("acquire");
    assert!(
        second.epoch > first.epoch,
        "revisions continue after reopen"
    );
    assert_ne!(second.block, first.block);
}
