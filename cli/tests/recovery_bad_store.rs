//! Recovery over a cluster store that holds bad entries (real etcd, a
//! private network namespace standing in for the node's kernel): observing
//! skips them instead of failing, the plan acts on valid leases only, and
//! no bad prefix reaches table 119. Root only (skipped otherwise).

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;

use coil::journal::{Batch, BlockLease, Journal, LeaseState};
use coil::store::backend::{Op, Txn};
use coil::store::{Backend, PoolSpec, Store};
use coil_adapters::etcd::{EtcdBackend, EtcdOptions};
use coil_adapters::kernel::Kernel;
use coil_testkit as testkit;
use ipnet::IpNet;

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(o.status.success(), "ip {args:?}: {o:?}");
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("crbad{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

async fn put_raw(s: &Store<EtcdBackend>, key: &str, value: &[u8]) {
    s.backend()
        .txn(
            "test",
            Txn::read(vec![Op::put(key.to_string(), value.to_vec())]),
        )
        .await
        .expect("write");
}

async fn snapshot(s: &Store<EtcdBackend>) -> Vec<(String, Vec<u8>, i64)> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_proceeds_past_bad_store_entries() {
    if !is_root() {
        eprintln!("skipped: needs root (a network namespace)");
        return;
    }
    let ns = Netns::new();
    let b = EtcdBackend::connect(&EtcdOptions {
        endpoints: vec![testkit::shared_etcd().expect("etcd for tests")],
        ..Default::default()
    })
    .await
    .expect("connect");
    let s = Store::open(b, &testkit::unique_prefix("recovery-bad"))
        .await
        .expect("open");
    s.create_pool(&PoolSpec {
        name: "default".into(),
        subnets: vec![net("10.64.0.0/24")],
        block_size: 5,
        ipv6_block_size: None,
    })
    .await
    .expect("pool");
    let good = s
        .acquire_specific("default", net("10.64.0.0/27"), "n1")
        .await
        .expect("good lease");
    // Bad entries, most of them naming this node: garbage, everything, a
    // lease of another pool under one of our journal's block keys, and a
    // lease stored under another block's key.
    let k = s.keys().clone();
    let held = net("10.64.0.64/27");
    let bad = [
        (
            format!("{}zz", k.pool_blocks("default")),
            b"garbage".to_vec(),
        ),
        (
            k.block("default", &net("0.0.0.0/0")),
            br#"{"pool":"default","block":"0.0.0.0/0","node":"n1","acquired_unix":1}"#.to_vec(),
        ),
        (
            k.block("default", &held),
            br#"{"pool":"other","block":"10.65.0.0/27","node":"n1","acquired_unix":1}"#.to_vec(),
        ),
        (
            k.block("default", &net("10.64.0.160/27")),
            br#"{"pool":"default","block":"10.64.0.128/27","node":"n1","acquired_unix":1}"#
                .to_vec(),
        ),
    ];
    for (key, value) in &bad {
        put_raw(&s, key, value).await;
    }
    let bad_keys: Vec<&String> = bad.iter().map(|(k, _)| k).collect();
    let bad_before: Vec<_> = snapshot(&s)
        .await
        .into_iter()
        .filter(|e| bad_keys.contains(&&e.0))
        .collect();
    assert_eq!(bad_before.len(), bad.len());

    // The journal holds the good block and the one whose key is now bad.
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Arc::new(Journal::open(dir.path()).expect("journal"));
    let mut batch = Batch::new();
    for (block, epoch) in [(good.block, good.epoch), (held, 1)] {
        batch.put_lease(&BlockLease {
            pool: "default".into(),
            block,
            epoch: u64::try_from(epoch).expect("epoch"),
            state: LeaseState::Leased,
            alloc_cursor: 0,
        });
    }
    j.commit(batch).expect("commit");

    let kernel = Kernel::in_netns(&ns.path(), 119, 30).await.expect("kernel");
    let cx = coil_recovery::Context {
        journal: &j,
        store: &s,
        kernel: &kernel,
        node: "n1",
        boot_id: "boot-1",
        mtu: 1500,
        full_scan: true,
        store_scan: true,
        hold_exports: false,
    };
    let seen = s.bad_entries_seen();
    let (o, out) = coil_recovery::recover(&cx, false)
        .await
        .expect("recovery proceeds past bad entries");
    assert!(s.bad_entries_seen() >= seen + bad.len() as u64);

    // The store as recovery saw it: the good lease only.
    let store = o.store.expect("store reachable");
    let blocks: Vec<IpNet> = store.iter().map(|l| l.block).collect();
    assert_eq!(blocks, vec![good.block], "{store:?}");

    // Steps on valid state succeed; the one on the block whose key holds a
    // bad entry (re-acquiring it: the store has no valid lease of it) fails,
    // naming the key, and the rest went on.
    assert!(
        out.iter()
            .any(|x| !x.ok && x.action.to_string().contains(&held.to_string())),
        "{out:?}"
    );
    for x in &out {
        let about_held = x.action.to_string().contains(&held.to_string());
        if about_held && !x.ok {
            let e = x.error.as_deref().unwrap_or_default();
            assert!(e.contains(&k.block("default", &held)), "{e}");
        } else {
            assert!(x.ok, "{}: {:?}", x.action, x.error);
        }
    }

    // Table 119 carries journal blocks only: no bad prefix.
    let exported = kernel.exported_blocks().await.expect("table 119");
    assert!(exported.contains(&good.block), "{exported:?}");
    for b in &exported {
        assert!(
            *b == good.block || *b == held,
            "{b} exported from a bad entry: {exported:?}"
        );
    }

    // Nothing bad was changed or deleted, and a second pass is as calm.
    let bad_after: Vec<_> = snapshot(&s)
        .await
        .into_iter()
        .filter(|e| bad_keys.contains(&&e.0))
        .collect();
    assert_eq!(bad_after, bad_before);
    let (o, _) = coil_recovery::recover(&cx, true)
        .await
        .expect("second pass");
    assert_eq!(o.store.map(|s| s.len()), Some(1));
}
