//! `coil-controller`: the cluster janitor.
//!
//! One replica leads (an etcd key bound to its lease; every action is
//! fenced on it, so a deposed leader frees nothing).
//!
//! **Liveness expiry is not proof of death.** A node cut off from etcd
//! looks exactly like a dead one and keeps serving pods from its blocks, so
//! the controller never frees a block because a liveness key expired. It
//! notes such a node as unreachable (`unreachable/<node>`, shown by
//! `coilctl node list`, the gauge `coil_controller_nodes_unreachable`) and,
//! after `--grace-period`, warns that its addresses stay reserved until an
//! operator says otherwise. It frees a node's blocks only on proof that its
//! pods are gone: the Kubernetes Node object is deleted. Then it removes
//! the node exactly as `coilctl node remove` does: one transaction records
//! the removal fence and frees the blocks, fenced on the node being without
//! liveness and on leadership.
//!
//! The Node list is only trusted when it is whole and sane: a list that
//! fails, is cut short, is not a `NodeList` or misses a page is "unknown"
//! (nothing is removed), and a list that is empty while nodes are alive, or
//! that would remove more than `--kube-max-deleted-fraction` of the nodes
//! holding blocks, is ignored for the pass and logged as an error. It also
//! garbage-collects the address index against the leases. The store is
//! polled every interval, so there is no watch to lose.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::{pem_file, split_endpoints, EtcdSettings};
use clap::Parser;
use coil::exit;
use coil::store::{Backend, NodeStatus, Store};
use coil_adapters::etcd::EtcdBackend;

#[derive(Parser, Debug)]
#[command(name = "coil-controller", version, about = "coil's cluster janitor")]
struct Args {
    /// Comma-separated etcd endpoints.
    #[arg(
        long,
        env = "COIL_CONTROLLER_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: String,
    #[arg(long, env = "COIL_CONTROLLER_ETCD_PREFIX", default_value = "/coil/")]
    etcd_prefix: String,
    #[arg(long, env = "COIL_CONTROLLER_ETCD_TIMEOUT", default_value = "2s")]
    etcd_timeout: String,
    #[arg(long, env = "COIL_CONTROLLER_ETCD_USERNAME")]
    etcd_username: Option<String>,
    #[arg(long, env = "COIL_CONTROLLER_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    #[arg(long, env = "COIL_CONTROLLER_ETCD_TLS_CA")]
    etcd_tls_ca: Option<PathBuf>,
    #[arg(long, env = "COIL_CONTROLLER_ETCD_TLS_CERT")]
    etcd_tls_cert: Option<PathBuf>,
    #[arg(long, env = "COIL_CONTROLLER_ETCD_TLS_KEY")]
    etcd_tls_key: Option<PathBuf>,
    /// How long a node's liveness must be gone before its blocks are freed.
    #[arg(long, env = "COIL_CONTROLLER_GRACE_PERIOD", default_value = "5m")]
    grace_period: String,
    /// How often the store is scanned.
    #[arg(long, env = "COIL_CONTROLLER_INTERVAL", default_value = "10s")]
    interval: String,
    /// TTL of the leader lease.
    #[arg(long, env = "COIL_CONTROLLER_ELECTION_TTL", default_value = "10s")]
    election_ttl: String,
    /// This replica's name in the election [default: hostname-pid].
    #[arg(long, env = "COIL_CONTROLLER_IDENTITY")]
    identity: Option<String>,
    /// Serve Prometheus metrics on this address (loopback recommended).
    #[arg(long, env = "COIL_CONTROLLER_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Watch Kubernetes Nodes: a node whose Node object is deleted and
    /// whose liveness is gone has its blocks freed without waiting for the
    /// grace period. The client is configured from `--kubeconfig`, else
    /// `KUBECONFIG` or `~/.kube/config`, else the in-cluster service account.
    #[arg(long, env = "COIL_CONTROLLER_KUBE")]
    kube: bool,
    /// Kubeconfig for `--kube` (implies it).
    #[arg(long, env = "COIL_CONTROLLER_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Ignore a Node list (for that pass) that would free the blocks of
    /// more than this fraction of the nodes holding blocks at once.
    #[arg(
        long,
        env = "COIL_CONTROLLER_KUBE_MAX_DELETED_FRACTION",
        default_value_t = 0.5,
        value_parser = parse_fraction
    )]
    kube_max_deleted_fraction: f64,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

/// Counters the controller exports.
#[derive(Debug, Default)]
pub struct ControllerMetrics {
    pub is_leader: std::sync::atomic::AtomicU64,
    /// Nodes without liveness that hold blocks (last pass).
    pub nodes_unreachable: std::sync::atomic::AtomicU64,
    /// Blocks those nodes hold.
    pub blocks_unreachable: std::sync::atomic::AtomicU64,
    /// Nodes removed because their Kubernetes Node was deleted.
    pub nodes_removed: std::sync::atomic::AtomicU64,
    pub blocks_released: std::sync::atomic::AtomicU64,
    pub index_entries_collected: std::sync::atomic::AtomicU64,
    pub passes: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
    /// Node lists that failed or were ignored by the sanity guard.
    pub kube_lists_ignored: std::sync::atomic::AtomicU64,
    /// Per pool, as of the leader's last pass: (name, blocks, leased).
    pub pools: std::sync::Mutex<Vec<(String, coil::store::Family, u64, u64)>>,
}

/// Where the controller learns which Nodes exist, and how far it trusts a
/// list.
#[derive(Debug, Clone)]
pub struct KubeNodes {
    pub nodes: crate::kube::NodeWatch,
    /// A list that would make more than this fraction of the nodes holding
    /// blocks due at once is ignored for the pass.
    pub max_deleted_fraction: f64,
}

pub use coil::removal::{judge_node_list, removable_nodes};

/// Nodes without liveness that hold blocks, and since when this leader has
/// seen them so (timers start afresh with each leadership).
pub fn unreachable_nodes<'a>(
    nodes: &'a [NodeStatus],
    seen_since: &mut HashMap<String, Instant>,
    now: Instant,
) -> Vec<(&'a NodeStatus, Instant)> {
    seen_since.retain(|n, _| {
        nodes
            .iter()
            .any(|x| &x.node == n && !x.alive && x.removed.is_none() && x.blocks > 0)
    });
    nodes
        .iter()
        .filter(|n| !n.alive && n.removed.is_none() && n.blocks > 0)
        .map(|n| (n, *seen_since.entry(n.node.clone()).or_insert(now)))
        .collect()
}

/// One pass as the leader: note unreachable nodes, remove nodes whose
/// Kubernetes Node is gone, collect the index.
/// What the leader carries from one pass to the next.
#[derive(Debug, Default)]
pub struct PassState {
    /// When each node was first seen without liveness.
    pub dead_since: HashMap<String, Instant>,
    /// Where the address index sweep goes on (a few pages per pass).
    pub index_cursor: Vec<u8>,
}

/// Address index pages (2,000 entries each) swept per pass.
const INDEX_PAGES_PER_PASS: usize = 5;

pub async fn pass<B: Backend>(
    store: &Store<B>,
    identity: &str,
    state: &mut PassState,
    grace: Duration,
    kube: Option<&KubeNodes>,
    m: &ControllerMetrics,
) -> Result<(), coil::store::StoreError> {
    use std::sync::atomic::Ordering;
    let nodes = store.nodes().await?;
    // Without a trustworthy list nothing is removed this pass.
    let existing = match kube {
        Some(k) => match k.nodes.snapshot() {
            Ok(names) => match judge_node_list(&nodes, &names, k.max_deleted_fraction) {
                Ok(()) => Some(names),
                Err(why) => {
                    m.kube_lists_ignored.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        nodes_listed = names.len(),
                        "ignoring the Kubernetes Node list this pass: {why}; no node is removed"
                    );
                    None
                }
            },
            Err(e) => {
                m.kube_lists_ignored.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("Kubernetes API (Node deletions unknown this pass): {e}");
                None
            }
        },
        None => None,
    };
    let now = Instant::now();
    let now_unix = coil::journal::now_unix();
    for n in nodes
        .iter()
        .filter(|n| n.alive && n.unreachable_since.is_some())
    {
        tracing::info!(node = %n.node, "node is reachable again");
        if let Err(e) = store.clear_unreachable(&n.node, identity).await {
            tracing::warn!(node = %n.node, "clearing its unreachable note: {e}");
        }
    }
    let unreachable = unreachable_nodes(&nodes, &mut state.dead_since, now);
    m.nodes_unreachable
        .store(unreachable.len() as u64, Ordering::Relaxed);
    m.blocks_unreachable.store(
        unreachable.iter().map(|(n, _)| n.blocks as u64).sum(),
        Ordering::Relaxed,
    );
    for (n, since) in &unreachable {
        if n.unreachable_since.is_none() {
            tracing::warn!(node = %n.node, blocks = n.blocks,
                "node lost its liveness; its blocks stay reserved (it may be partitioned, \
                 not dead)");
            if let Err(e) = store.note_unreachable(&n.node, now_unix, identity).await {
                tracing::warn!(node = %n.node, "noting it unreachable: {e}");
            }
        }
        let waited = now.duration_since(*since);
        if waited >= grace && waited < grace + Duration::from_secs(1) + grace / 4 {
            tracing::error!(node = %n.node, blocks = n.blocks, "node unreachable for {waited:?}; \
                its addresses stay reserved. If it is gone for good, delete its Node object \
                or run `coilctl node remove {}`", n.node);
        }
    }
    for node in removable_nodes(&nodes, existing.as_ref()) {
        match store
            .remove_node(
                &node,
                "its Kubernetes Node object was deleted (coil-controller)",
                false,
                Some(identity),
            )
            .await
        {
            Ok(rec) => {
                m.nodes_removed.fetch_add(1, Ordering::Relaxed);
                m.blocks_released
                    .fetch_add(rec.blocks.len() as u64, Ordering::Relaxed);
                tracing::info!(node = %node, blocks = rec.blocks.len(),
                    "removed a node whose Kubernetes Node was deleted, and freed its blocks");
            }
            Err(coil::store::StoreError::NodeAlive { .. }) => {
                tracing::info!(node = %node, "kept the node: it is alive again");
            }
            Err(e) => {
                m.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %node, "removing it: {e}");
            }
        }
    }
    // Pool capacity for the alert rules: one read of the block keys.
    match store.pool_capacity().await {
        Ok(pools) => *m.pools.lock().unwrap_or_else(|e| e.into_inner()) = pools,
        Err(e) => tracing::warn!("reading the pools' capacity: {e}"),
    }
    let (n, next) = store
        .gc_address_index_pages(identity, &state.index_cursor, INDEX_PAGES_PER_PASS)
        .await?;
    state.index_cursor = next.unwrap_or_default();
    if n > 0 {
        tracing::info!(entries = n, "collected address index entries with no lease");
    }
    m.index_entries_collected
        .fetch_add(n as u64, Ordering::Relaxed);
    m.passes.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Runs the controller; returns the exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    crate::coilctl::init_logging_with("info");
    let a: Args = match crate::parse_args(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let parse = crate::config::parse_duration;
    let (grace, interval, ttl) = match (
        parse(&a.grace_period),
        parse(&a.interval),
        parse(&a.election_ttl),
    ) {
        (Ok(g), Ok(i), Ok(t)) => (g, i, t),
        (g, i, t) => {
            for e in [g.err(), i.err(), t.err()].into_iter().flatten() {
                eprintln!("coil-controller: {e}");
            }
            return exit::USAGE;
        }
    };
    let given = EtcdSettings {
        endpoints: Some(split_endpoints(&a.etcd_endpoints)),
        prefix: Some(a.etcd_prefix.clone()),
        timeout: Some(a.etcd_timeout.clone()),
        username: a.etcd_username.clone(),
        password: a.etcd_password.clone(),
        tls_ca: pem_file(a.etcd_tls_ca.clone()),
        tls_cert: pem_file(a.etcd_tls_cert.clone()),
        tls_key: pem_file(a.etcd_tls_key.clone()),
    };
    let etcd = match given.resolve(Err("no etcd endpoints given")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coil-controller: {e}");
            return exit::USAGE;
        }
    };
    let opts = etcd.options;
    let identity = a.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "controller".into());
        format!("{host}-{}", std::process::id())
    });
    let rt = match crate::runtime("coil-controller", true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        // A bad Kubernetes configuration is a usage error, found first.
        let kube = if a.kube || a.kubeconfig.is_some() {
            match crate::kube::client(a.kubeconfig.as_deref()).await {
                Ok(c) => Some(KubeNodes {
                    nodes: crate::kube::NodeWatch::start(c),
                    max_deleted_fraction: a.kube_max_deleted_fraction,
                }),
                Err(e) => {
                    eprintln!("coil-controller: {e}");
                    return exit::USAGE;
                }
            }
        } else {
            None
        };
        let b = match EtcdBackend::connect(&opts).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("coil-controller: {e}");
                return exit::UNAVAILABLE;
            }
        };
        let store = match Store::open_lazy(b, &etcd.prefix) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("coil-controller: {e}");
                return exit::USAGE;
            }
        };
        let metrics = std::sync::Arc::new(ControllerMetrics::default());
        if let Some(addr) = a.metrics_addr {
            let m = metrics.clone();
            match crate::metrics::serve(addr, move || controller_metrics(&m)).await {
                Ok(()) => tracing::info!(%addr, "metrics"),
                Err(e) => {
                    eprintln!("coil-controller: metrics on {addr}: {e}");
                    return exit::USAGE;
                }
            }
        }
        run(
            &store,
            &identity,
            grace,
            interval,
            ttl,
            kube.as_ref(),
            &metrics,
        )
        .await;
        exit::OK
    })
}

fn controller_metrics(m: &ControllerMetrics) -> String {
    use crate::metrics::{labels, Exposition};
    use std::sync::atomic::Ordering;
    let mut x = Exposition::new(&[]);
    let v = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let n = |a: &std::sync::atomic::AtomicU64| i64::try_from(v(a)).unwrap_or(i64::MAX);
    x.gauge(
        "coil_controller_leader",
        "1 while this replica leads.",
        n(&m.is_leader),
    );
    x.counter(
        "coil_controller_blocks_released_total",
        "Blocks freed with nodes whose Kubernetes Node was deleted.",
        v(&m.blocks_released),
    );
    x.counter(
        "coil_controller_nodes_removed_total",
        "Nodes removed because their Kubernetes Node was deleted.",
        v(&m.nodes_removed),
    );
    x.gauge(
        "coil_controller_nodes_unreachable",
        "Nodes without liveness that still hold blocks (not freed: maybe partitioned).",
        n(&m.nodes_unreachable),
    );
    x.gauge(
        "coil_controller_blocks_unreachable",
        "Blocks held by unreachable nodes.",
        n(&m.blocks_unreachable),
    );
    x.counter(
        "coil_controller_index_entries_collected_total",
        "Address index entries without a lease deleted.",
        v(&m.index_entries_collected),
    );
    x.counter(
        "coil_controller_passes_total",
        "Passes made as the leader.",
        v(&m.passes),
    );
    x.counter(
        "coil_controller_errors_total",
        "Failed store operations.",
        v(&m.errors),
    );
    x.counter(
        "coil_controller_kube_lists_ignored_total",
        "Kubernetes Node lists that failed or looked wrong, so were not acted on.",
        v(&m.kube_lists_ignored),
    );
    // Only the leader's pass fills these (a follower's would be stale).
    let pools = m.pools.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let leading = m.is_leader.load(Ordering::Relaxed) == 1;
    let series = |col: usize| {
        pools
            .iter()
            .filter(|_| leading)
            .map(|(pool, family, total, leased)| {
                let v = if col == 1 { *total } else { *leased };
                (
                    labels(&[("pool", pool), ("family", &family.to_string())]),
                    i64::try_from(v).unwrap_or(i64::MAX),
                )
            })
            .collect()
    };
    x.gauges(
        "coil_pool_blocks",
        "Blocks in the pool (as of the leader's last pass).",
        series(1),
    );
    x.gauges(
        "coil_pool_blocks_leased",
        "Blocks of the pool leased to nodes (as of the leader's last pass).",
        series(2),
    );
    x.render()
}

/// The leader loop: campaign, keep the lease alive, act, repeat. Runs
/// until SIGTERM/SIGINT.
pub async fn run<B: Backend>(
    store: &Store<B>,
    identity: &str,
    grace: Duration,
    interval: Duration,
    ttl: Duration,
    kube: Option<&KubeNodes>,
    m: &ControllerMetrics,
) {
    use std::sync::atomic::Ordering;
    let mut lease: Option<i64> = None;
    let mut state = PassState::default();
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        let leading = match lease {
            Some(id) => store.keep_alive(id).await.unwrap_or(false),
            None => match store.campaign(identity, ttl_secs).await {
                Ok(Some(id)) => {
                    tracing::info!(identity, "elected leader");
                    lease = Some(id);
                    // Grace timers start afresh with each leadership.
                    state = PassState::default();
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!("campaign: {e}");
                    false
                }
            },
        };
        if !leading && lease.is_some() {
            tracing::warn!(identity, "lost leadership");
            lease = None;
        }
        m.is_leader.store(u64::from(leading), Ordering::Relaxed);
        if leading {
            if let Err(e) = pass(store, identity, &mut state, grace, kube, m).await {
                m.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("pass: {e}");
            }
        }
        let sleep = tokio::time::sleep(interval);
        tokio::select! {
            _ = sleep => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    if let Some(id) = lease {
        let _ = store.deregister_node(id).await;
        tracing::info!(identity, "stepped down");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(node: &str, alive: bool, blocks: usize) -> NodeStatus {
        NodeStatus {
            node: node.into(),
            alive,
            boot_id: None,
            started_unix: None,
            blocks,
            unreachable_since: None,
            removed: None,
        }
    }

    #[test]
    fn pool_gauges_are_exported_by_the_leader_only() {
        let m = ControllerMetrics::default();
        *m.pools.lock().expect("pools") = vec![
            ("default".into(), coil::store::Family::Ipv4, 16, 3),
            ("default".into(), coil::store::Family::Ipv6, 256, 1),
        ];
        let follower = controller_metrics(&m);
        assert!(
            follower.contains("coil_controller_leader 0\n"),
            "{follower}"
        );
        assert!(!follower.contains("coil_pool_blocks{"), "{follower}");
        m.is_leader.store(1, std::sync::atomic::Ordering::Relaxed);
        let leader = controller_metrics(&m);
        assert!(
            leader.contains("coil_pool_blocks{pool=\"default\",family=\"ipv4\"} 16\n"),
            "{leader}"
        );
        assert!(
            leader.contains("coil_pool_blocks_leased{pool=\"default\",family=\"ipv4\"} 3\n"),
            "{leader}"
        );
        assert!(
            leader.contains("coil_pool_blocks{pool=\"default\",family=\"ipv6\"} 256\n"),
            "{leader}"
        );
    }

    #[test]
    fn liveness_expiry_alone_never_removes_a_node() {
        let t0 = Instant::now();
        let mut since = HashMap::new();
        let nodes = vec![
            st("alive", true, 3),
            st("dead", false, 2),
            st("empty", false, 0),
        ];
        // However long it has been, without the Kubernetes API saying the
        // Node is gone nothing is removed.
        assert!(removable_nodes(&nodes, None).is_empty());
        let u = unreachable_nodes(&nodes, &mut since, t0);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].0.node, "dead");
        let later = t0 + Duration::from_secs(3600);
        let u = unreachable_nodes(&nodes, &mut since, later);
        assert_eq!(u[0].1, t0, "the timer is kept");
        assert!(removable_nodes(&nodes, None).is_empty());
        // The Node object is listed: still nothing.
        let existing: std::collections::BTreeSet<String> =
            ["alive".to_string(), "dead".to_string()].into();
        assert!(removable_nodes(&nodes, Some(&existing)).is_empty());
        // Deleted: removed. A live node never is, even when the API lost
        // its Node (v1's B12); a node holding nothing needs no removal.
        let existing: std::collections::BTreeSet<String> = ["other".to_string()].into();
        assert_eq!(
            removable_nodes(&nodes, Some(&existing)),
            vec!["dead".to_string()]
        );
        // Already removed: not again.
        let mut gone = nodes.clone();
        gone[1].removed = Some(coil::store::RemovalRecord {
            node: "dead".into(),
            removed_unix: 1,
            reason: "test".into(),
            blocks: vec![],
        });
        assert!(removable_nodes(&gone, Some(&existing)).is_empty());
        // Back alive: its timer is forgotten.
        let back = vec![st("dead", true, 2)];
        assert!(unreachable_nodes(&back, &mut since, later).is_empty());
        assert!(since.is_empty());
    }

    #[test]
    fn suspect_node_lists_are_refused() {
        let set = |names: &[&str]| -> std::collections::BTreeSet<String> {
            names.iter().map(|n| n.to_string()).collect()
        };
        let nodes = vec![
            st("a", true, 1),
            st("b", false, 1),
            st("c", false, 1),
            st("d", false, 1),
            st("e", false, 0),
        ];
        // Empty while nodes are alive: never trusted.
        let e = judge_node_list(&nodes, &set(&[]), 1.0).expect_err("empty");
        assert!(e.contains("no Node at all"), "{e}");
        // Two of the four holders gone: exactly half is allowed.
        assert!(judge_node_list(&nodes, &set(&["a", "b"]), 0.5).is_ok());
        // Three of four: more than half.
        let e = judge_node_list(&nodes, &set(&["a"]), 0.5).expect_err("3/4");
        assert!(e.contains("3 of the 4"), "{e}");
        assert!(judge_node_list(&nodes, &set(&["a"]), 0.75).is_ok());
        // A live node missing from the list, or one holding nothing, does
        // not count: it would not be freed.
        assert!(judge_node_list(&nodes, &set(&["b", "c", "d"]), 0.0).is_ok());
        // No node alive and nothing held: an empty list frees nothing.
        assert!(judge_node_list(&[st("e", false, 0)], &set(&[]), 0.5).is_ok());
        assert!(parse_fraction("0.25").is_ok());
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("NaN").is_err());
    }
}
