//! coil's cost as the cluster grows, by simulation against a real etcd.
//!
//! For each size N (COIL_BENCH_SCALE_NODES, default "500,1000,5000"), on a
//! fresh private etcd: N simulated nodes in this process, each using the
//! real store client (`coil::store::Store` over the etcd adapter) the way
//! coild does:
//! - boot storm: every node registers its liveness lease and leases the
//!   blocks for its pods at once (pods per node spread over 1..=59, 30 on
//!   average: 150,000 pods at 5,000 nodes; blocks of 32 addresses);
//! - the address index filled for every pod (coild's asynchronous mirror);
//! - steady state, 30 s: each node keeps its lease alive every 10 s (TTL
//!   30 s, coild's default) and resyncs every 30 s with the store view a
//!   resync reads (`Store::node_view`); etcd's own gRPC counters give the
//!   requests per second per node;
//! - the real controller's pass (`coil_cli::controller::pass`) as leader;
//! - `coilctl pool show`, `node list`, `node blocks`, `address info` run
//!   as processes against that etcd;
//! - etcd's database size.
//!
//! Figures `scale.N.*` go to target/bench/summary.json. Nodes share etcd
//! connections (one per 50 nodes; a real node has its own), which makes
//! etcd's connection count, not its request load, smaller than a real
//! cluster's. Memory is measured on real processes at each size: the
//! `coil-controller` binary leading for a few passes, and coild (this
//! benchmark re-run as a child: the real daemon over the etcd store, with
//! the in-memory kernel model so it needs no netns) starting as a new node
//! and taking 30 pods; their peak RSS (VmHWM) is `scale.N.controller_rss_kib`
//! and `scale.N.coild_rss_kib`. The run prints how long each size is
//! expected to take; 5,000 nodes take a few minutes.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coil::store::{AddressRecord, NodeRecord, PoolSpec, Store};
use coil_adapters::etcd::{EtcdBackend, EtcdOptions};
use coil_cli::controller::{pass, ControllerMetrics};
use coil_testkit::{etcd_metric, TestEtcd};

// The HTTPS fake Kubernetes API of the tests (there is no kube-apiserver
// here): the controller's Node watch at this size.
#[path = "../tests/fakekube/mod.rs"]
mod fakekube;

const COILCTL: &str = env!("CARGO_BIN_EXE_coilctl");
const CONTROLLER: &str = env!("CARGO_BIN_EXE_coil-controller");
/// Set in the child that runs coild for the RSS figure.
const CHILD_ENV: &str = "COIL_SCALE_COILD_CHILD";
const NODES_PER_CONNECTION: usize = 50;
const BLOCK_SIZE: u8 = 5;
const STEADY: Duration = Duration::from_secs(30);

/// Pods on node `i`: 1..=59, spread evenly (30 on average).
fn pods_of(i: usize) -> usize {
    1 + (i * 37) % 59
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// Requests etcd has received: unary calls plus keep-alive messages.
fn etcd_requests(endpoint: &str) -> f64 {
    etcd_metric(endpoint, "grpc_server_msg_received_total", &[]).expect("etcd metrics")
}

/// Runs coilctl against `endpoint`; returns (ms, ok).
fn coilctl(endpoint: &str, args: &[&str]) -> (f64, bool) {
    let t = Instant::now();
    let o = Command::new(COILCTL)
        .args(["--etcd-endpoints", endpoint])
        .args(args)
        .output()
        .expect("coilctl");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !o.status.success() {
        eprintln!(
            "  coilctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    (ms, o.status.success())
}

async fn connect(endpoint: &str) -> Arc<Store<EtcdBackend>> {
    let b = EtcdBackend::connect(&EtcdOptions {
        endpoints: vec![endpoint.to_string()],
        timeout: Duration::from_secs(10),
        ..Default::default()
    })
    .await
    .expect("connect to etcd");
    Arc::new(Store::open(b, "/coil/").await.expect("open store"))
}

struct SimNode {
    name: String,
    lease: i64,
    blocks: Vec<(String, ipnet::IpNet)>,
}

fn run_size(n: usize, figs: &mut Vec<(String, f64, &'static str)>) {
    let started = Instant::now();
    let etcd = TestEtcd::start().expect("etcd");
    let ep = etcd.endpoint.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pods_total: usize = (0..n).map(pods_of).sum();
    eprintln!("scale {n}: {n} nodes, {pods_total} pods");
    let stores: Vec<Arc<Store<EtcdBackend>>> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..n.div_ceil(NODES_PER_CONNECTION) {
            v.push(connect(&ep).await);
        }
        v
    });
    let admin = stores[0].clone();
    rt.block_on(async {
        admin
            .create_pool(&PoolSpec {
                name: "default".into(),
                subnets: vec!["10.0.0.0/11".parse().expect("net")],
                block_size: BLOCK_SIZE,
                ipv6_block_size: None,
            })
            .await
            .expect("pool")
    });

    // 1. Boot storm: every node at once.
    let t = Instant::now();
    let nodes: Vec<SimNode> = rt.block_on(async {
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let s = stores[i / NODES_PER_CONNECTION].clone();
            tasks.push(tokio::spawn(async move {
                let name = node_name(i);
                let rec = NodeRecord {
                    node: name.clone(),
                    boot_id: format!("boot-{i}"),
                    started_unix: 1,
                    version: "bench".into(),
                };
                let lease = s.register_node(&rec, 30).await?;
                let want = pods_of(i).div_ceil(1 << BLOCK_SIZE);
                let mut blocks = Vec::with_capacity(want);
                for _ in 0..want {
                    let l = s.acquire_block("default", &name).await?;
                    blocks.push((l.pool, l.block));
                }
                Ok::<_, coil::store::StoreError>(SimNode {
                    name,
                    lease,
                    blocks,
                })
            }));
        }
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.expect("task").expect("boot"));
        }
        out
    });
    let boot_s = t.elapsed().as_secs_f64();
    let blocks_total: usize = nodes.iter().map(|x| x.blocks.len()).sum();
    eprintln!("  boot storm: {blocks_total} blocks leased in {boot_s:.1} s");
    figs.push((format!("scale.{n}.boot_storm_s"), boot_s, "s"));

    // 2. The address index, as coild's mirror fills it.
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let s = stores[i / NODES_PER_CONNECTION].clone();
            let name = node.name.clone();
            let blocks = node.blocks.clone();
            let pods = pods_of(i);
            tasks.push(tokio::spawn(async move {
                for p in 0..pods {
                    let (pool, block) = &blocks[p >> BLOCK_SIZE];
                    let base = match block.network() {
                        IpAddr::V4(a) => u32::from(a),
                        IpAddr::V6(_) => unreachable!("IPv4 pool"),
                    };
                    let rec = AddressRecord {
                        address: IpAddr::V4(Ipv4Addr::from(base + (p as u32 % 32))),
                        pool: pool.clone(),
                        block: *block,
                        node: name.clone(),
                        network: "k8s-pod-network".into(),
                        container_id: format!("{name}-pod{p}"),
                        ifname: "eth0".into(),
                        pod_namespace: "default".into(),
                        pod_name: format!("pod-{p}"),
                    };
                    s.put_address(&rec).await?;
                }
                Ok::<_, coil::store::StoreError>(())
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("index");
        }
    });
    let index_s = t.elapsed().as_secs_f64();
    eprintln!("  address index: {pods_total} entries in {index_s:.1} s");
    figs.push((format!("scale.{n}.index_fill_s"), index_s, "s"));

    // 3. Steady state: 30 s of each node's life at its own phase: a
    //    keep-alive every 10 s (TTL 30 s, coild's default) and one resync
    //    (every 30 s) reading the store view a resync reads. Requests are
    //    counted by etcd and divided by the node-seconds simulated.
    let before = etcd_requests(&ep);
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let s = stores[i / NODES_PER_CONNECTION].clone();
            let lease = node.lease;
            let name = node.name.clone();
            let blocks = node.blocks.clone();
            let phase = Duration::from_millis((i as u64 * 7919) % 10_000);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(phase).await;
                let ticks = (STEADY.as_secs() / 10) as u32;
                for k in 0..ticks {
                    let _ = s.keep_alive(lease).await;
                    if k == 0 {
                        let _ = s.node_view(&name, &blocks).await;
                    }
                    if k + 1 < ticks {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let per_node = (etcd_requests(&ep) - before) / STEADY.as_secs_f64() / n as f64;
    eprintln!(
        "  steady state: {per_node:.3} etcd requests/s per idle node ({:.0} s simulated)",
        t.elapsed().as_secs_f64()
    );
    figs.push((
        format!("scale.{n}.etcd_requests_per_s_per_node"),
        per_node,
        "requests/s",
    ));

    // 4. Memory of the real programs at this size (before this process
    // campaigns, so the controller leads).
    match controller_rss(&ep) {
        Some(kib) => {
            eprintln!("  coil-controller peak RSS: {:.1} MiB", kib / 1024.0);
            figs.push((format!("scale.{n}.controller_rss_kib"), kib, "KiB"));
        }
        None => eprintln!("  coil-controller RSS: not measured"),
    }
    match coild_rss(&ep) {
        Some(kib) => {
            eprintln!(
                "  coild peak RSS (new node, 30 pods): {:.1} MiB",
                kib / 1024.0
            );
            figs.push((format!("scale.{n}.coild_rss_kib"), kib, "KiB"));
        }
        None => eprintln!("  coild RSS: not measured"),
    }

    // 4b. The controller's Node set at this size, from the HTTPS fake: the
    // paged list until the set is whole, then one deletion by the watch.
    let (list_ms, delete_ms) = rt.block_on(node_watch(n));
    eprintln!(
        "  Node set of {n} Nodes: whole after {list_ms:.0} ms; a deletion seen after {delete_ms:.1} ms"
    );
    figs.push((format!("scale.{n}.node_list_ms"), list_ms, "ms"));
    figs.push((format!("scale.{n}.node_delete_seen_ms"), delete_ms, "ms"));

    // 5. The controller's pass, as leader.
    let (pass_ms, passes) = rt.block_on(async {
        admin
            .campaign("bench-controller", 60)
            .await
            .expect("campaign")
            .expect("leader");
        let m = ControllerMetrics::default();
        m.is_leader.store(1, std::sync::atomic::Ordering::Relaxed);
        let mut since = coil_cli::controller::PassState::default();
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            pass(
                &admin,
                "bench-controller",
                &mut since,
                Duration::from_secs(300),
                None,
                &m,
            )
            .await
            .expect("pass");
            best = best.min(t.elapsed().as_secs_f64() * 1000.0);
        }
        (best, m.passes.load(std::sync::atomic::Ordering::Relaxed))
    });
    eprintln!("  controller pass: {pass_ms:.0} ms (best of {passes})");
    figs.push((format!("scale.{n}.controller_pass_ms"), pass_ms, "ms"));

    // 6. The CLI at this size.
    let probe = &nodes[n / 2];
    let probe_addr = match probe.blocks[0].1.network() {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + 1).to_string(),
        IpAddr::V6(_) => unreachable!("IPv4 pool"),
    };
    for (tag, args) in [
        ("pool_show", vec!["pool", "show", "default"]),
        ("node_list", vec!["node", "list"]),
        ("node_blocks", vec!["node", "blocks", probe.name.as_str()]),
        ("address_info", vec!["address", "info", probe_addr.as_str()]),
    ] {
        let (ms, ok) = coilctl(&ep, &args);
        eprintln!(
            "  coilctl {}: {ms:.0} ms{}",
            args.join(" "),
            if ok { "" } else { " (failed)" }
        );
        if ok {
            figs.push((format!("scale.{n}.cli.{tag}_ms"), ms, "ms"));
        }
    }

    // 7. etcd's database.
    let db = etcd_metric(&ep, "etcd_mvcc_db_total_size_in_bytes", &[]).expect("etcd metrics");
    eprintln!("  etcd database: {:.1} MiB", db / 1048576.0);
    figs.push((format!("scale.{n}.etcd_db_bytes"), db, "bytes"));
    eprintln!(
        "scale {n}: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    drop(stores);
    drop(rt);
    drop(etcd);
}

/// Peak RSS (VmHWM) of process `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Stops a child this benchmark started (SIGTERM, then waits).
fn stop(mut c: std::process::Child) {
    if let Ok(pid) = i32::try_from(c.id()) {
        // SAFETY: signalling a child process this benchmark spawned.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let _ = c.wait();
}

/// The coil-controller binary leading over this store for a few passes
/// (one a second); its peak RSS.
fn controller_rss(ep: &str) -> Option<f64> {
    let c = Command::new(CONTROLLER)
        .args([
            "--etcd-endpoints",
            ep,
            "--interval",
            "1s",
            "--identity",
            "bench-rss",
        ])
        .env("COIL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_secs(6));
    let kib = vm_hwm_kib(c.id());
    stop(c);
    kib
}

/// coild as a new node of this cluster, run by this benchmark's own binary
/// as a child (see [`coild_child`]); its peak RSS once it serves 30 pods.
fn coild_rss(ep: &str) -> Option<f64> {
    use std::io::BufRead;
    let dir = tempfile::tempdir().ok()?;
    let exe = std::env::current_exe().ok()?;
    let mut c = Command::new(exe)
        .env(CHILD_ENV, ep)
        .env("COIL_SCALE_CHILD_DIR", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .ok()?;
    let mut line = String::new();
    let out = c.stdout.take()?;
    let _ = std::io::BufReader::new(out).read_line(&mut line);
    let kib = if line.trim() == "ready" {
        std::thread::sleep(Duration::from_secs(2));
        vm_hwm_kib(c.id())
    } else {
        eprintln!("  coild child: {line:?}");
        None
    };
    drop(c.stdin.take());
    let _ = c.wait();
    kib
}

/// The child of [`coild_rss`]: the real daemon over the etcd store and
/// the in-memory kernel, started as node `scale-rss-node`, then 30 ADDs;
/// prints "ready" and runs until its stdin closes.
fn coild_child(ep: &str) {
    use std::io::Read;
    let dir = std::path::PathBuf::from(std::env::var("COIL_SCALE_CHILD_DIR").unwrap_or_default());
    std::fs::write(dir.join("boot_id"), "rss-boot\n").expect("boot id");
    let opts = EtcdOptions {
        endpoints: vec![ep.to_string()],
        ..Default::default()
    };
    let cfg = coil_cli::coild::DaemonConfig {
        node_name: "scale-rss-node".into(),
        store: coil_cli::coild::StoreChoice::Etcd {
            opts: opts.clone(),
            prefix: "/coil/".into(),
        },
        table_id: 119,
        protocol_id: 30,
        mtu: 1500,
        socket: dir.join("coild.sock"),
        journal_dir: dir.join("journal"),
        boot_id_file: dir.join("boot_id"),
        liveness_ttl: Duration::from_secs(30),
        pool_cache_ttl: Duration::from_secs(10),
        resync_interval: Duration::from_secs(30),
        min_blocks: 1,
        metrics_addr: None,
        events: coil_cli::kube::EventSink::disabled(),
        engine: Default::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let kernel = coil::kernel_mem::MemKernel::new(119);
    let d = rt.block_on(async {
        let journal = Arc::new(coil_cli::coild::open_journal(&cfg.journal_dir).expect("journal"));
        let b = EtcdBackend::connect(&opts).await.expect("etcd");
        let store = Store::open_lazy(b, "/coil/").expect("store");
        coil_cli::coild::Daemon::start_with(cfg, journal, store, kernel.clone())
            .await
            .expect("coild starts")
    });
    for i in 0..30 {
        let netns = format!("/run/netns/rss{i}");
        kernel.add_netns(&netns);
        let env = [
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", format!("rss{i}")),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_NETNS", netns),
        ];
        let req = coil::cni::parse_request(
            |k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
            br#"{"cniVersion":"1.1.0","name":"k8s","type":"coil"}"#,
        )
        .expect("request");
        let dd = d.clone();
        let r = rt.block_on(async move { dd.handle(req).await });
        assert!(r.ok, "ADD: {}", r.stdout);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(d);
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// Times the controller's Node watch against a fake API holding `n`
/// Nodes: (ms until the list is whole, ms until a deletion is seen).
async fn node_watch(n: usize) -> (f64, f64) {
    let fake = fakekube::FakeKube::start(None);
    fake.with(|st| {
        for i in 0..n {
            st.add_node(&format!("node-{i:05}"), serde_json::json!([]));
        }
    });
    let cfg = coil_cli::kube::config(Some(&fake.kubeconfig()))
        .await
        .expect("kubeconfig");
    let client = coil_cli::kube::client_from(cfg, coil_cli::kube::MAX_ANSWER).expect("client");
    let t = Instant::now();
    let w = coil_cli::kube::NodeWatch::start(client);
    let deadline = t + Duration::from_secs(60);
    while !w.snapshot().is_ok_and(|s| s.len() == n) {
        assert!(Instant::now() < deadline, "the Node list never completed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let list_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    fake.with(|st| st.delete_node("node-00000"));
    while !w.snapshot().is_ok_and(|s| !s.contains("node-00000")) {
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "no deletion seen"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (list_ms, t.elapsed().as_secs_f64() * 1000.0)
}

fn main() {
    if let Ok(ep) = std::env::var(CHILD_ENV) {
        coild_child(&ep);
        return;
    }
    let sizes: Vec<usize> = std::env::var("COIL_BENCH_SCALE_NODES")
        .unwrap_or_else(|_| "500,1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let pods: usize = sizes
        .iter()
        .map(|n| (0..*n).map(pods_of).sum::<usize>())
        .sum();
    eprintln!(
        "scale benchmark: sizes {sizes:?}, {pods} address index entries in all; \
         expect roughly 1 minute per 1,000 nodes plus 30 s of steady state per size"
    );
    let mut figs = Vec::new();
    for n in sizes {
        run_size(n, &mut figs);
    }
    println!("\n{:<44} {:>12}", "figure", "value");
    for (k, v, unit) in &figs {
        println!("{k:<44} {v:>12.3} {unit}");
    }
    coil_testkit::write_bench_summary(
        &figs
            .iter()
            .map(|(k, v, u)| (k.clone(), *v, *u))
            .collect::<Vec<_>>(),
    )
    .expect("summary");
}
