//! After the storm: convergence, the invariant checks and the summary.

use super::*;

/// Drains the DEL backlog (as runtimes would), repairs, then checks the
/// invariants with the surviving pods, then deletes them and checks that
/// nothing leaked.
pub(crate) fn converge(sh: &Shared) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let item = sh.model.lock().expect("model").to_del.pop();
        let Some(item) = item else { break };
        let r = cni(&sh.node, "DEL", &item.0, item.1.as_deref());
        if r.code == 0 {
            if let Some(ns) = &item.1 {
                let _ = sh_quiet(&["ip", "netns", "del", ns]);
            }
        } else {
            sh.check_error("DEL", &r);
            sh.model.lock().expect("model").to_del.push(item);
            if Instant::now() > deadline {
                sh.violation("DELs kept failing after the chaos ended".into());
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let o = sh.node.coilctl(&["node", "repair"]);
    if !o.status.success() {
        sh.violation(format!(
            "final node repair failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
}

pub(crate) fn pod_addrs(ns: &str) -> Vec<IpAddr> {
    String::from_utf8_lossy(&sh(&["ip", "-n", ns, "-o", "addr", "show", "dev", "eth0"]).stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .filter(|a: &IpAddr| !matches!(a, IpAddr::V6(v) if v.segments()[0] == 0xfe80))
        .collect()
}

pub(crate) fn finish(sh: &Shared, args: &Args, elapsed: Duration) -> i32 {
    let node = &sh.node;
    let live: Vec<(String, (String, Vec<IpAddr>))> = sh
        .model
        .lock()
        .expect("model")
        .live
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // 1. Every successful ADD is still wired; 2. no address twice.
    let mut seen: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (cid, (ns, ips)) in &live {
        let addrs = pod_addrs(ns);
        for ip in ips {
            if !addrs.contains(ip) {
                sh.violation(format!(
                    "{cid}: ADD answered {ip} but the pod has {addrs:?}"
                ));
            }
            let (fam, host) = if ip.is_ipv4() {
                ("-4", 32)
            } else {
                ("-6", 128)
            };
            let route = String::from_utf8_lossy(
                &node
                    .in_ns(&["ip", fam, "route", "show", &format!("{ip}/{host}")])
                    .stdout,
            )
            .to_string();
            if !route.contains("dev coil") {
                sh.violation(format!("{cid}: no host route to {ip} ({route:?})"));
            }
            if let Some(other) = seen.insert(*ip, cid.clone()) {
                sh.violation(format!("address {ip} assigned to both {other} and {cid}"));
            }
        }
    }
    // 3. Table 119 equals the node's leases in etcd.
    let leased: BTreeSet<String> = serde_json::from_slice::<Value>(
        &node
            .coilctl(&["node", "blocks", "chaos-node", "--json"])
            .stdout,
    )
    .ok()
    .and_then(|v| v.as_array().cloned())
    .unwrap_or_default()
    .iter()
    .filter_map(|b| b["block"].as_str().map(String::from))
    .collect();
    let table = node.table119();
    if leased != table {
        sh.violation(format!(
            "table 119 {table:?} differs from the leases {leased:?}"
        ));
    }
    // 4. Delete every pod: nothing may leak.
    for (cid, (ns, _)) in &live {
        let r = cni(node, "DEL", cid, Some(ns));
        if r.code != 0 {
            sh.violation(format!("final DEL of {cid} failed: {}", r.out));
        }
        let _ = sh_quiet(&["ip", "netns", "del", ns]);
    }
    sh.model.lock().expect("model").live.clear();
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let last = node.stats();
        let links = node.coil_links();
        let blocks = node.table119().len();
        // coild keeps one empty block of each family (min-blocks 1), in
        // table 119 and in its journal (a block withdrawn but never given
        // back to the store would be a leak).
        let held = last["blocks"].as_u64().unwrap_or(u64::MAX);
        if last["attachments"] == 0 && links.is_empty() && blocks <= 2 && held <= 2 {
            break last;
        }
        if Instant::now() > deadline {
            sh.violation(format!(
                "after deleting every pod: stats {last}, links {links:?}, {blocks} block(s) in table 119, {held} in the journal (min 1 per family)"
            ));
            break last;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for ip in seen.keys() {
        let v: Value = serde_json::from_slice(
            &node
                .coilctl(&["address", "info", &ip.to_string(), "--json"])
                .stdout,
        )
        .unwrap_or(Value::Null);
        if !v["assignment"].is_null() {
            // The index is asynchronous: give it a moment once.
            std::thread::sleep(Duration::from_secs(3));
            let v: Value = serde_json::from_slice(
                &node
                    .coilctl(&["address", "info", &ip.to_string(), "--json"])
                    .stdout,
            )
            .unwrap_or(Value::Null);
            if !v["assignment"].is_null() {
                sh.violation(format!(
                    "address index still lists {ip}: {}",
                    v["assignment"]
                ));
            }
        }
    }
    let c = &sh.c;
    let violations = sh.model.lock().expect("model").violations.clone();
    let result = json!({
        "seed": args.seed,
        "seconds": elapsed.as_secs(),
        "ops": c.ops.load(Ordering::Relaxed),
        "add_ok": c.add_ok.load(Ordering::Relaxed),
        "add_failed": c.add_err.load(Ordering::Relaxed),
        "del_ok": c.del_ok.load(Ordering::Relaxed),
        "del_failed": c.del_err.load(Ordering::Relaxed),
        "retryable_errors": c.retryable.load(Ordering::Relaxed),
        "kills": c.kills.load(Ordering::Relaxed),
        "failpoint_kills": c.failpoint_kills.load(Ordering::Relaxed),
        "etcd_restarts": c.etcd_restarts.load(Ordering::Relaxed),
        "reboots": c.reboots.load(Ordering::Relaxed),
        "corruptions": c.corruptions.load(Ordering::Relaxed),
        "rebuilds": c.rebuilds.load(Ordering::Relaxed),
        "pods_checked": seen.len(),
        "violations": violations.len(),
        "final_stats": last,
    });
    println!();
    println!("chaos summary (seed {}):", args.seed);
    for k in [
        "ops",
        "add_ok",
        "add_failed",
        "del_ok",
        "del_failed",
        "retryable_errors",
        "kills",
        "failpoint_kills",
        "etcd_restarts",
        "reboots",
        "corruptions",
        "rebuilds",
        "pods_checked",
        "violations",
    ] {
        println!("  {k:<17} {}", result[k]);
    }
    for v in &violations {
        println!("  violation: {v}");
    }
    if !violations.is_empty() {
        println!(
            "  reproduce with: chaos-tests/run --seed {} --duration {}",
            args.seed,
            args.duration.as_secs()
        );
    }
    println!("CHAOS_RESULT {result}");
    let summary = args
        .summary
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench/summary.json"));
    write_summary(
        &summary,
        &[
            (
                "chaos.kills",
                result["kills"].as_f64().unwrap_or(0.0),
                "kills",
            ),
            (
                "chaos.ops",
                result["ops"].as_f64().unwrap_or(0.0),
                "operations",
            ),
            ("chaos.violations", violations.len() as f64, "violations"),
        ],
    );
    if violations.is_empty() {
        0
    } else {
        1
    }
}

pub(crate) fn write_summary(path: &Path, figs: &[(&str, f64, &str)]) {
    if let Some(p) = path.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    let mut all: BTreeMap<String, Value> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (k, v, u) in figs {
        all.insert(k.to_string(), json!({"value": v, "unit": u}));
    }
    let _ = std::fs::write(
        path,
        serde_json::to_string_pretty(&all).unwrap_or_default() + "\n",
    );
}
