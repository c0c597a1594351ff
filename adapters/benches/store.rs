//! Block acquisition against a real etcd (a private server this benchmark
//! starts on a loopback port), next to the baseline of the same number of
//! bare create-if-absent transactions at the same concurrency in the same
//! run: the ceiling etcd itself sets.
//!
//! Figures (merged into `COIL_BENCH_SUMMARY`, default
//! target/bench/summary.json):
//! - store.acquire.per_s.c1/c10/c100: acquisitions per second with 1, 10
//!   and 100 simulated nodes on a pool of 16,384 blocks;
//! - store.txn.per_s.c1/c10/c100: the bare-txn baseline;
//! - store.acquire.etcd_requests: requests per successful acquisition at
//!   100 nodes, counted at the client (target < 3);
//! - store.embedded.acquire.per_s.c1: the embedded backend, for scale.
//!
//! Knob: `COIL_BENCH_ACQUIRE` (acquisitions per concurrency level, default
//! 2000).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use coil::store::backend::{Cmp, CmpOp, Op, Txn};
use coil::store::embedded::EmbeddedBackend;
use coil::store::{Backend, PoolSpec, Store};
use coil_adapters::etcd::{EtcdBackend, EtcdOptions};
use coil_testkit::{unique_prefix, TestEtcd};

fn spec() -> PoolSpec {
    // 10.128.0.0/10 in blocks of 256 addresses: 2^14 = 16,384 blocks.
    PoolSpec {
        name: "default".into(),
        subnets: vec!["10.128.0.0/10".parse().expect("net")],
        block_size: 8,
        ipv6_block_size: None,
    }
}

/// `total` acquisitions spread over `nodes` concurrent simulated nodes,
/// each with its own Store (own pool cache) on a shared connection.
/// Returns (per second, requests per acquisition).
async fn acquire_run<B: Backend + Clone>(
    backend: B,
    prefix: &str,
    nodes: usize,
    total: usize,
) -> (f64, f64) {
    let admin = Store::open(backend.clone(), prefix).await.expect("open");
    admin.create_pool(&spec()).await.expect("create pool");
    let before = backend.requests();
    let per_node = total / nodes;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..nodes {
        let b = backend.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let s = Store::open(b, &prefix).await.expect("open");
            let node = format!("node-{n:03}");
            let mut got = Vec::with_capacity(per_node);
            for _ in 0..per_node {
                got.push(
                    s.acquire_block("default", &node)
                        .await
                        .expect("acquire")
                        .block,
                );
            }
            got
        }));
    }
    let mut all = HashSet::new();
    let mut count = 0usize;
    for t in tasks {
        for b in t.await.expect("task") {
            count += 1;
            assert!(all.insert(b), "block {b} leased twice");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let requests = backend.requests() - before;
    // Opening a Store reads the schema once per node; count it too.
    (count as f64 / secs, requests as f64 / count as f64)
}

/// The baseline: the same number of create-if-absent transactions on
/// distinct keys, at the same concurrency.
async fn txn_run(backend: EtcdBackend, prefix: &str, nodes: usize, total: usize) -> f64 {
    let per_node = total / nodes;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..nodes {
        let b = backend.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_node {
                let key = format!("{prefix}raw/{n:03}/{i:06}").into_bytes();
                let r = b
                    .txn(
                        "baseline",
                        Txn {
                            when: vec![Cmp::CreateRevision {
                                key: key.clone(),
                                op: CmpOp::Equal,
                                rev: 0,
                            }],
                            then: vec![Op::put(key, b"{\"node\":\"n\"}".to_vec())],
                            otherwise: vec![],
                        },
                    )
                    .await
                    .expect("txn");
                assert!(r.succeeded);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    (per_node * nodes) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let total: usize = std::env::var("COIL_BENCH_ACQUIRE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let etcd = TestEtcd::start().expect("start etcd (install etcd-server)");
    println!("store benchmark: private etcd at {}", etcd.endpoint);
    let mut figures: Vec<(String, f64, &str)> = Vec::new();
    rt.block_on(async {
        let backend = EtcdBackend::connect(&EtcdOptions {
            endpoints: vec![etcd.endpoint.clone()],
            ..Default::default()
        })
        .await
        .expect("connect");
        println!(
            "{:>6}  {:>14}  {:>14}  {:>8}  {:>12}",
            "nodes", "acquire/s", "bare txn/s", "ratio", "requests/acq"
        );
        for nodes in [1usize, 10, 100] {
            let n = if nodes == 1 { total / 4 } else { total };
            let base = txn_run(backend.clone(), &unique_prefix("bench-raw"), nodes, n).await;
            let (rate, reqs) =
                acquire_run(backend.clone(), &unique_prefix("bench"), nodes, n).await;
            println!(
                "{nodes:>6}  {rate:>14.0}  {base:>14.0}  {:>8.2}  {reqs:>12.3}",
                rate / base
            );
            figures.push((
                format!("store.acquire.per_s.c{nodes}"),
                rate,
                "acquisitions/s",
            ));
            figures.push((format!("store.txn.per_s.c{nodes}"), base, "txn/s"));
            if nodes == 100 {
                figures.push((
                    "store.acquire.etcd_requests".into(),
                    reqs,
                    "requests/acquisition",
                ));
                figures.push((
                    "store.acquire.vs_txn.c100".into(),
                    rate / base,
                    "ratio (1.0 = etcd's own ceiling)",
                ));
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Arc::new(coil::journal::Journal::open(dir.path()).expect("journal"));
        let emb = Arc::new(EmbeddedBackend::open(j).expect("embedded"));
        let (rate, _) = acquire_run(emb, "/coil/", 1, total / 4).await;
        println!("embedded, 1 node: {rate:.0} acquisitions/s");
        figures.push((
            "store.embedded.acquire.per_s.c1".into(),
            rate,
            "acquisitions/s",
        ));
    });
    let reqs = figures
        .iter()
        .find(|f| f.0 == "store.acquire.etcd_requests")
        .map(|f| f.1)
        .unwrap_or(f64::NAN);
    println!(
        "etcd requests per acquisition at 100 nodes: {reqs:.3} (target < 3): {}",
        if reqs < 3.0 { "met" } else { "MISSED" }
    );
    coil_testkit::write_bench_summary(&figures).expect("summary");
    drop(etcd);
}
