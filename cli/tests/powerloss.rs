//! coild under power cuts: its state directory on coil-lazyfs (a FUSE
//! filesystem that forgets everything not fsynced), pods added and deleted
//! through the real plugin, blocks leased from and released to a real etcd.
//! A power cut forgets the unsynced writes, kills coild (-9) and simulates
//! the reboot that follows (new boot id; pod namespaces, coil's veths and
//! table 119 gone). After each restart: coild serves without manual help,
//! every previous-boot attachment is released, table 119 equals the node's
//! leases in etcd (both families: the pool is dual-stack), and no address
//! is handed out twice; a new pod gets one address of each family. A journal whose
//! fsync fails (EIO from the filesystem) makes coild fail loudly.
//!
//! `COIL_POWERLOSS_CUTS` (default 6) and `COIL_POWERLOSS_SEED` replay;
//! `scripts/bench powerloss` runs more. Root and /dev/fuse (scripts/test
//! sets COIL_REQUIRE_FUSE=1, so it never skips silently there).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coil_lazyfs::{CutOptions, Mount, OpKind, Trip};
use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn fuse_or_skip() -> bool {
    if Mount::available() {
        return true;
    }
    assert!(
        std::env::var("COIL_REQUIRE_FUSE").as_deref() != Ok("1"),
        "COIL_REQUIRE_FUSE=1 but /dev/fuse is missing"
    );
    eprintln!("SKIPPED: no /dev/fuse");
    false
}

/// The node's leased blocks according to etcd.
fn etcd_blocks(n: &Node) -> BTreeSet<String> {
    let o = n.coilctl(&["node", "blocks", &n.name, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["block"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The blocks in table 119, both families.
fn table119_blocks(n: &Node) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for family in ["-4", "-6"] {
        let o = sh(&[
            "ip", family, "-n", &n.netns, "route", "show", "table", "119",
        ]);
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from)),
        );
    }
    out
}

/// What a reboot leaves of coil in the kernel: nothing.
fn wipe_kernel(n: &mut Node, pods: &[String]) {
    for p in pods {
        let _ = sh(&["ip", "netns", "del", p]);
    }
    for l in n.coil_links() {
        let _ = sh(&["ip", "-n", &n.netns, "link", "del", &l]);
    }
    let _ = sh(&["ip", "-n", &n.netns, "route", "flush", "table", "119"]);
}

struct Figures {
    cuts: u32,
    /// Cuts that forgot something coild had written.
    dropped: u32,
    violations: Vec<String>,
}

#[test]
fn coild_survives_power_cuts() {
    if !fuse_or_skip() {
        return;
    }
    let cuts: u32 = std::env::var("COIL_POWERLOSS_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("COIL_POWERLOSS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("powerloss: seed {seed} (COIL_POWERLOSS_SEED replays), {cuts} cut(s)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let fsdir = tempfile::tempdir().expect("tempdir");
    let mount = Mount::new(&fsdir.path().join("backing"), &fsdir.path().join("mnt"))
        .expect("mount coil-lazyfs");
    // coild creates its state directory itself (durably): it must survive
    // a cut right after the first commits.
    let state = mount.path().join("state");
    let mut n = Node::new_with(
        StoreMode::Etcd {
            endpoint: String::new(),
            prefix: "/coil/".into(),
        },
        &[&[
            "pool",
            "create",
            "default",
            "10.58.0.0/24",
            "--ipv6",
            "fd00:58::/120",
            "--block-size",
            "3",
        ]],
        |n| {
            n.state_dir = Some(state.clone());
            n.extra = ["--resync-interval", "1s", "--min-blocks", "1"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        },
    );
    let mut f = Figures {
        cuts: 0,
        dropped: 0,
        violations: Vec::new(),
    };
    for cut in 0..cuts {
        // A storm of ADD/DEL from another thread while the power goes.
        let pods: Vec<String> = (0..6).map(|_| n.pod()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(0u32));
        let conf = n.conf("1.0.0");
        let storm = {
            let (stop, acked, pods) = (stop.clone(), acked.clone(), pods.clone());
            let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ u64::from(cut));
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let p = &pods[r.gen_range(0..pods.len())];
                    let cmd = if r.gen_bool(0.6) { "ADD" } else { "DEL" };
                    let c = cni(
                        &[
                            ("CNI_COMMAND", cmd),
                            ("CNI_CONTAINERID", &format!("{p}x")),
                            ("CNI_NETNS", &format!("/run/netns/{p}")),
                            ("CNI_IFNAME", "eth0"),
                        ],
                        conf.as_bytes(),
                    );
                    if c.code == 0 {
                        *acked.lock().expect("acked") += 1;
                    }
                    i += 1;
                    if i > 2000 {
                        break;
                    }
                }
            })
        };
        // Half the cuts land exactly before one of the journal's WAL
        // fdatasyncs (the filesystem fails it and everything after, as a
        // dead machine would), so an acknowledged-looking frame is in
        // flight; the others at a random moment.
        if rng.gen_bool(0.5) {
            mount.arm(Trip {
                op: OpKind::Fsync,
                path_contains: "/journal/wal/".into(),
                skip: rng.gen_range(0..60),
            });
            let deadline = Instant::now() + Duration::from_secs(8);
            while mount.tripped().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            std::thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
        }
        // Power cut: coild dies with the machine, the disk keeps only what
        // was synced (a torn last write where the dice say so).
        n.kill9();
        stop.store(true, Ordering::Relaxed);
        let _ = storm.join();
        let report = mount
            .cut(CutOptions {
                seed: rng.gen(),
                keep_prob: if rng.gen_bool(0.5) { 0.0 } else { 0.3 },
                tear_last: rng.gen_bool(0.5),
            })
            .expect("cut");
        f.cuts += 1;
        wipe_kernel(&mut n, &pods);
        n.set_boot_id(&format!("boot-cut-{cut}"));
        // It must come back by itself.
        n.start();
        let mut problems = Vec::new();
        let settled = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let st = n.stats();
                let ok = st["attachments"] == 0 && table119_blocks(&n) == etcd_blocks(&n);
                if ok || Instant::now() > deadline {
                    break ok;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        if !settled {
            problems.push(format!(
                "not settled: attachments {}, table 119 {:?}, etcd {:?}",
                n.stats()["attachments"],
                table119_blocks(&n),
                etcd_blocks(&n)
            ));
        }
        // New pods get one address of each family (a dual-stack pool),
        // all distinct.
        let fresh: Vec<String> = (0..4).map(|_| n.pod()).collect();
        let mut seen = BTreeSet::new();
        for (i, p) in fresh.iter().enumerate() {
            let a = n.add(p, &format!("after{cut}x{i}"));
            if a.code != 0 {
                problems.push(format!("ADD after the cut failed: {a:?}"));
                continue;
            }
            let ips = a.ips();
            let v6 = ips.iter().filter(|ip| ip.contains(':')).count();
            if ips.len() != 2 || v6 != 1 {
                problems.push(format!("not one address of each family: {ips:?}"));
            }
            for ip in ips {
                if !seen.insert(ip.clone()) {
                    problems.push(format!("address {ip} handed out twice"));
                }
            }
        }
        for (i, p) in fresh.iter().enumerate() {
            let _ = n.del(p, &format!("after{cut}x{i}"));
        }
        if report.dropped_anything() {
            f.dropped += 1;
        }
        eprintln!(
            "powerloss: cut {cut}: {} acknowledged calls before it, tripped {:?}, dropped anything: {}, {}",
            acked.lock().map(|a| *a).unwrap_or(0),
            report.tripped,
            report.dropped_anything(),
            if problems.is_empty() {
                "ok"
            } else {
                "VIOLATION"
            }
        );
        for p in problems {
            f.violations
                .push(format!("cut {cut} (seed {seed}): {p}\n{}", n.log()));
        }
    }

    // A journal whose fsync fails: coild fails loudly, acknowledges
    // nothing it could not make durable, and a restart recovers.
    let keep = n.pod();
    assert_eq!(n.add(&keep, "keep").code, 0);
    mount.arm(Trip {
        op: OpKind::Fsync,
        path_contains: "/journal/wal/".into(),
        skip: 0,
    });
    let p = n.pod();
    let r = n.add(&p, "eio");
    assert_ne!(r.code, 0, "an ADD acknowledged over a failed fsync: {r:?}");
    let st = n.wait_exit(20);
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(1),
        "coild kept running on a journal that cannot sync: {}",
        n.log()
    );
    assert!(mount.tripped().is_some());
    n.kill9();
    mount.cut(CutOptions::forget()).expect("cut");
    n.start();
    let c = n.call("CHECK", "1.0.0", &keep, "keep", "eth0", "");
    assert_eq!(c.code, 0, "the acknowledged pod did not survive: {c:?}");
    assert_ne!(n.call("CHECK", "1.0.0", &p, "eio", "eth0", "").code, 0);

    let figs = vec![
        (
            "coild.powerloss.cuts".to_string(),
            f64::from(f.cuts),
            "cuts",
        ),
        (
            "coild.powerloss.violations".to_string(),
            f.violations.len() as f64,
            "violations",
        ),
        (
            "coild.powerloss.cuts_that_dropped".to_string(),
            f64::from(f.dropped),
            "cuts",
        ),
    ];
    let _ = coil_testkit::write_bench_summary(&figs);
    n.stop();
    assert!(f.violations.is_empty(), "{}", f.violations.join("\n\n"));
}
