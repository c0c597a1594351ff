//! coil's chaos harness (run it through `chaos-tests/run`).
//!
//! On this machine, as root: a node network namespace with etcd and coild
//! (built with failpoints), pods as network namespaces, ADD/DEL storms
//! through the real `coil` binary from concurrent callers, while coild is
//! SIGKILLed at random moments and at every failpoint, etcd is killed and
//! restarted, reboots are simulated (every pod netns and coil's kernel
//! state wiped, new boot id) and the journal is corrupted and rebuilt with
//! `coilctl node repair --rebuild`. After a final convergence it checks the
//! invariants of "nothing lost, nothing doubled" and prints a summary
//! ending with a machine-readable line. Exit 1 on any violation.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Every failpoint coild has, cycled through by the kills.
use coil::failpoint::ALL as FAILPOINTS;

mod cluster;

mod args;
mod node;
mod storm;
mod verdict;

use args::*;
use node::*;
use storm::*;
use verdict::*;

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chaos: {e}");
            std::process::exit(2);
        }
    };
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("chaos: run as root (network namespaces)");
        std::process::exit(2);
    }
    if args.cluster {
        std::process::exit(cluster::main(&args));
    }
    let dir = tempfile::Builder::new()
        .prefix("coil-chaos-")
        .tempdir()
        .expect("tempdir");
    let ns = format!("chaosnode{}", std::process::id() % 10000);
    let _ = sh_quiet(&["ip", "netns", "del", &ns]);
    sh_ok(&["ip", "netns", "add", &ns]);
    sh_ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    let node = Node {
        ns: ns.clone(),
        dir: dir.path().to_path_buf(),
        bins: std::fs::canonicalize(&args.bin_dir).expect("bin dir"),
        socket: dir.path().join("coild.sock"),
        etcd: Mutex::new(None),
        coild: Mutex::new(None),
        boot: AtomicU64::new(1),
    };
    node.set_boot(1);
    node.start_etcd();
    let o = node.coilctl(&[
        "pool",
        "create",
        "default",
        "10.60.0.0/22",
        "--ipv6",
        "fd00:60::/118",
        "--block-size",
        "3",
    ]);
    assert!(o.status.success(), "pool create: {o:?}");
    node.start_coild(None).expect("coild");
    println!(
        "chaos: seed {} for {:?} with {} callers (node netns {ns}, dir {})",
        args.seed,
        args.duration,
        args.workers,
        dir.path().display()
    );
    let sh = Arc::new(Shared {
        node,
        model: Mutex::new(Model::default()),
        c: Counters::default(),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        inflight: AtomicUsize::new(0),
    });
    let workers: Vec<_> = (0..args.workers)
        .map(|i| {
            let s = sh.clone();
            let seed = args.seed.wrapping_add(i as u64 + 1);
            std::thread::spawn(move || worker(s, seed))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let start = Instant::now();
    let mut k: usize = 0;
    let mut last_report = Instant::now();
    // Faults stop for the last 15% of the run: the callers go on, so pods
    // added in calm conditions are checked too, next to chaos survivors.
    let chaos_until = args.duration.mul_f64(0.85);
    let mut calm = false;
    while start.elapsed() < args.duration {
        std::thread::sleep(Duration::from_millis(rng.gen_range(80..700)));
        if start.elapsed() > chaos_until {
            if !calm {
                // The last restart may have armed a failpoint: the calm
                // tail starts with a coild that has none.
                calm = true;
                if sh.node.reap() == Some(Some(libc::SIGABRT)) {
                    sh.c.failpoint_kills.fetch_add(1, Ordering::Relaxed);
                    sh.c.kills.fetch_add(1, Ordering::Relaxed);
                }
                sh.node.kill_coild();
                ensure_coild(&sh);
                continue;
            }
            if let Some(sig) = sh.node.reap() {
                sh.violation(format!("coild died in the calm tail (signal {sig:?})"));
                ensure_coild(&sh);
            }
            continue;
        }
        // A failpoint may have killed coild: count it and restart.
        if let Some(sig) = sh.node.reap() {
            if sig == Some(libc::SIGABRT) {
                sh.c.failpoint_kills.fetch_add(1, Ordering::Relaxed);
                sh.c.kills.fetch_add(1, Ordering::Relaxed);
            } else {
                sh.violation(format!(
                    "coild died on its own (signal {sig:?}); see its log"
                ));
            }
            ensure_coild(&sh);
        }
        let dice: f64 = rng.gen();
        if dice < 0.75 {
            // SIGKILL at a random moment, then restart, half the time with
            // the next failpoint armed.
            sh.node.kill_coild();
            sh.c.kills.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
            let fp = rng.gen_bool(0.5).then(|| {
                k += 1;
                FAILPOINTS[k % FAILPOINTS.len()]
            });
            if sh.node.start_coild(fp).is_err() {
                ensure_coild(&sh);
            }
        } else if dice < 0.84 {
            sh.node.kill_etcd();
            sh.c.etcd_restarts.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(rng.gen_range(500..2500)));
            sh.node.start_etcd();
        } else if dice < 0.91 {
            reboot(&sh);
        } else if dice < 0.96 {
            corrupt(&sh, &mut rng);
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            last_report = Instant::now();
            println!(
                "  {:>4}s ops {} kills {} (failpoints {}) etcd restarts {} reboots {} corruptions {}",
                start.elapsed().as_secs(),
                sh.c.ops.load(Ordering::Relaxed),
                sh.c.kills.load(Ordering::Relaxed),
                sh.c.failpoint_kills.load(Ordering::Relaxed),
                sh.c.etcd_restarts.load(Ordering::Relaxed),
                sh.c.reboots.load(Ordering::Relaxed),
                sh.c.corruptions.load(Ordering::Relaxed),
            );
        }
    }
    // ---- convergence
    sh.stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    sh.node.start_etcd();
    if sh.node.reap().is_some() || sh.node.coild.lock().expect("coild").is_none() {
        ensure_coild(&sh);
    }
    // Restart without any failpoint armed.
    sh.node.kill_coild();
    ensure_coild(&sh);
    converge(&sh);
    let report = finish(&sh, &args, start.elapsed());
    sh.node.kill_coild();
    sh.node.kill_etcd();
    for n in sh_ok(&["ip", "netns", "list"]).lines() {
        let name = n.split_whitespace().next().unwrap_or("");
        if name.starts_with("cx") {
            let _ = sh_quiet(&["ip", "netns", "del", name]);
        }
    }
    let _ = sh_quiet(&["ip", "netns", "del", &ns]);
    // process::exit runs no destructors: remove the run's directory (some
    // 130 MB of etcd data and journals) here, or keep it, named, when the
    // run failed, as the cluster mode does.
    if report == 0 {
        drop(dir);
    } else {
        let kept = dir.keep();
        let _ = std::fs::remove_dir_all(kept.join("etcd"));
        println!("  logs and journal kept in {}", kept.display());
    }
    std::process::exit(report);
}
