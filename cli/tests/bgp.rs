//! Two nodes, one etcd, BIRD 2 with deploy/bird/bird.conf.tmpl on each:
//! pods on different nodes reach each other through BGP-learnt routes, a
//! released block disappears from the peer's main table, and a node whose
//! coild stopped for good keeps its blocks (the controller only reports it
//! unreachable) until `coilctl node remove` frees them for the other node.
//! Root only.

mod common;

use std::path::{Path, PathBuf};

use std::time::Duration;

use common::*;

struct Two {
    ns: [String; 2],
    link: [String; 2],
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
    pods: Vec<String>,
}

impl Drop for Two {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        for b in 0..2 {
            let pid = self.dir.path().join(format!("bird{b}.pid"));
            if let Ok(p) = std::fs::read_to_string(&pid) {
                let _ = sh(&["kill", p.trim()]);
            }
        }
        for p in &self.pods {
            let _ = sh(&["ip", "netns", "del", p]);
        }
        for n in &self.ns {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

fn in_ns(ns: &str, args: &[&str]) -> std::process::Output {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

impl Two {
    fn socket(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("coild{i}.sock"))
    }

    fn coilctl(&self, args: &[&str]) -> std::process::Output {
        let mut v = vec![COILCTL, "--etcd-endpoints", "http://127.0.0.1:2379"];
        v.extend_from_slice(args);
        in_ns(&self.ns[0], &v)
    }

    fn start_coild(&mut self, i: usize, min_blocks: &str) -> usize {
        let etcd = if i == 0 {
            "http://127.0.0.1:2379".to_string()
        } else {
            format!("http://{}:2379", self.link[0])
        };
        let state = self.dir.path().join(format!("state{i}"));
        let sock = self.socket(i);
        let _ = std::fs::remove_file(&sock);
        std::fs::write(self.dir.path().join("boot"), "boot-1\n").expect("boot");
        let node = format!("node-{}", i + 1);
        let p = spawn_in(
            &self.ns[i],
            &[
                COILD,
                "--store",
                "etcd",
                "--etcd-endpoints",
                &etcd,
                "--node-name",
                &node,
                "--state-dir",
                &state.display().to_string(),
                "--socket",
                &sock.display().to_string(),
                "--boot-id-file",
                &self.dir.path().join("boot").display().to_string(),
                "--resync-interval",
                "1s",
                "--liveness-ttl",
                "3s",
                "--min-blocks",
                min_blocks,
            ],
            &self.dir.path().join(format!("coild{i}.log")),
        );
        self.procs.push(p);
        wait_until("coild ready", 20, || sock.exists());
        self.procs.len() - 1
    }

    fn conf(&self, i: usize) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"bgp","socket":"{}"}}"#,
            self.socket(i).display()
        )
    }

    fn add(&mut self, i: usize, cid: &str) -> String {
        let pod = unique("b");
        ok(&["ip", "netns", "add", &pod]);
        ok(&["ip", "-n", &pod, "link", "set", "lo", "up"]);
        self.pods.push(pod.clone());
        let r = cni(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &format!("/run/netns/{pod}")),
                ("CNI_IFNAME", "eth0"),
            ],
            self.conf(i).as_bytes(),
        );
        assert_eq!(r.code, 0, "ADD on node {i}: {r:?}");
        pod
    }

    fn del(&self, i: usize, cid: &str, pod: &str) {
        let r = cni(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &format!("/run/netns/{pod}")),
                ("CNI_IFNAME", "eth0"),
            ],
            self.conf(i).as_bytes(),
        );
        assert_eq!(r.code, 0, "DEL: {r:?}");
    }

    /// Blocks in node `i`'s table 119, IPv4 then IPv6.
    fn table119(&self, i: usize) -> Vec<String> {
        ["-4", "-6"]
            .iter()
            .flat_map(|f| {
                String::from_utf8_lossy(
                    &in_ns(&self.ns[i], &["ip", f, "route", "show", "table", "119"]).stdout,
                )
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .collect::<Vec<_>>()
            })
            .collect()
    }

    fn main_has(&self, i: usize, block: &str) -> bool {
        let family = if block.contains(':') { "-6" } else { "-4" };
        !String::from_utf8_lossy(
            &in_ns(&self.ns[i], &["ip", family, "route", "show", block]).stdout,
        )
        .trim()
        .is_empty()
    }
}

fn pod_ip(pod: &str) -> String {
    String::from_utf8_lossy(&sh(&["ip", "-n", pod, "-o", "-4", "addr", "show", "eth0"]).stdout)
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string()
}

/// Two node netns joined by a veth (IPv4 10.251.0.0/24, and IPv6
/// fd00:251::/64 when `dual`), etcd on node 1, a default pool (dual-stack
/// when `dual`), and BIRD on both nodes from the deploy/ template for the
/// families, its BGP sessions established.
fn two_nodes(dual: bool) -> Two {
    let mut t = Two {
        ns: [unique("g"), unique("g")],
        link: ["10.251.0.1".into(), "10.251.0.2".into()],
        dir: tempfile::tempdir().expect("tempdir"),
        procs: Vec::new(),
        pods: Vec::new(),
    };
    for n in &t.ns {
        ok(&["ip", "netns", "add", n]);
        ok(&["ip", "-n", n, "link", "set", "lo", "up"]);
        in_ns(
            n,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
    }
    let (a, b) = (format!("{}x", t.ns[0]), format!("{}x", t.ns[1]));
    ok(&[
        "ip", "link", "add", &a, "netns", &t.ns[0], "type", "veth", "peer", "name", &b, "netns",
        &t.ns[1],
    ]);
    for (i, dev) in [(0, &a), (1, &b)] {
        let v4 = format!("10.251.0.{}/24", i + 1);
        ok(&["ip", "-n", &t.ns[i], "addr", "add", &v4, "dev", dev]);
        if dual {
            let v6 = format!("fd00:251::{}/64", i + 1);
            ok(&[
                "ip", "-n", &t.ns[i], "addr", "add", &v6, "dev", dev, "nodad",
            ]);
        }
        ok(&["ip", "-n", &t.ns[i], "link", "set", dev, "up"]);
    }

    // One etcd, on node 1, reachable from node 2 over the link.
    let etcd =
        coil_testkit::start_etcd_in_netns(&t.ns[0], t.dir.path(), Some("http://10.251.0.1:2379"))
            .expect("etcd");
    t.procs.push(Proc(Some(etcd)));
    let mut pool = vec![
        "pool",
        "create",
        "default",
        "10.252.0.0/24",
        "--block-size",
        "4",
    ];
    if dual {
        pool.extend(["--ipv6", "fd00:252::/120", "--ipv6-block-size", "4"]);
    }
    let o = t.coilctl(&pool);
    assert!(o.status.success(), "{o:?}");

    // BIRD on both nodes from the deploy/ template.
    let tmpl = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(if dual {
        "../deploy/bird/bird-dualstack.conf.tmpl"
    } else {
        "../deploy/bird/bird.conf.tmpl"
    }))
    .expect("template");
    for i in 0..2 {
        let j = 1 - i;
        let conf = tmpl
            .replace("@ROUTER_ID@", &t.link[i])
            .replace("@LOCAL_IP@", &t.link[i])
            .replace("@LOCAL_IP6@", &format!("fd00:251::{}", i + 1))
            .replace("@LOCAL_AS@", &(64601 + i).to_string())
            .replace("@PEER_IP@", &t.link[j])
            .replace("@PEER_IP6@", &format!("fd00:251::{}", j + 1))
            .replace("@PEER_AS@", &(64601 + j).to_string())
            .replace("@TABLE@", "119");
        assert!(!conf.contains('@'), "a placeholder is left: {conf}");
        let cf = t.dir.path().join(format!("bird{i}.conf"));
        std::fs::write(&cf, conf).expect("bird conf");
        let o = in_ns(&t.ns[i], &["bird", "-p", "-c", &cf.display().to_string()]);
        assert!(o.status.success(), "bird -p: {o:?}");
        let o = in_ns(
            &t.ns[i],
            &[
                "bird",
                "-c",
                &cf.display().to_string(),
                "-s",
                &t.dir
                    .path()
                    .join(format!("bird{i}.ctl"))
                    .display()
                    .to_string(),
                "-P",
                &t.dir
                    .path()
                    .join(format!("bird{i}.pid"))
                    .display()
                    .to_string(),
            ],
        );
        assert!(o.status.success(), "bird: {o:?}");
    }
    let sessions: &[&str] = if dual {
        &["coil_peer", "coil_peer6"]
    } else {
        &["coil_peer"]
    };
    for i in 0..2 {
        let ctl = t
            .dir
            .path()
            .join(format!("bird{i}.ctl"))
            .display()
            .to_string();
        for p in sessions {
            wait_until(&format!("BGP {p} Established"), 40, || {
                String::from_utf8_lossy(&sh(&["birdc", "-s", &ctl, "show", "protocols", p]).stdout)
                    .contains("Established")
            });
        }
    }
    t
}

#[test]
fn two_nodes_route_pods_over_bgp() {
    let mut t = two_nodes(false);
    // Node 1 keeps no idle block, so a release is visible.
    t.start_coild(0, "0");
    t.start_coild(1, "1");
    let p1 = t.add(0, "bgp-a");
    let p2 = t.add(1, "bgp-b");
    let b1 = t.table119(0);
    let b2 = t.table119(1);
    assert_eq!(b1.len(), 1, "{b1:?}");
    assert_eq!(b2.len(), 1, "{b2:?}");
    wait_until("node 2 learns node 1's block", 30, || t.main_has(1, &b1[0]));
    wait_until("node 1 learns node 2's block", 30, || t.main_has(0, &b2[0]));
    let ip2 = pod_ip(&p2);
    let ip1 = pod_ip(&p1);
    wait_until("pod a reaches pod b across nodes", 20, || ping(&p1, &ip2));
    assert!(ping(&p2, &ip1), "pod b reaches pod a");

    // Node 1's only pod goes: its block is released (two empty resyncs)
    // and withdrawn from node 2's main table.
    t.del(0, "bgp-a", &p1);
    wait_until("node 1 releases its empty block", 30, || {
        t.table119(0).is_empty()
    });
    wait_until("node 2 forgets the block", 30, || !t.main_has(1, &b1[0]));

    // Node 1 leases a block again, then its coild stops for good (kill -9:
    // the liveness lease just expires).
    let _p3 = t.add(0, "bgp-c");
    let b3 = t.table119(0);
    assert_eq!(b3.len(), 1);
    let idx = t.procs.len() - 2;
    t.procs[idx].kill();
    let ctl_log = t.dir.path().join("controller.log");
    let c = spawn_in(
        &t.ns[0],
        &[
            CONTROLLER,
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--grace-period",
            "1s",
            "--interval",
            "300ms",
            "--identity",
            "bgp-test",
        ],
        &ctl_log,
    );
    t.procs.push(c);
    // Liveness expiry is no proof of death: the controller reports node 1
    // unreachable and keeps its block reserved, well past the grace.
    wait_until("the controller reports node 1 unreachable", 40, || {
        let o = t.coilctl(&["node", "list"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("node-1") && l.contains("unreachable since"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let o = t.coilctl(&["node", "blocks", "node-1", "--json"]);
    assert_ne!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "[]",
        "the controller freed a block on liveness expiry"
    );
    // The operator knows node 1 is gone for good: removing it frees it.
    let o = t.coilctl(&["node", "remove", "node-1"]);
    assert!(o.status.success(), "{o:?}");
    let o = t.coilctl(&["node", "blocks", "node-1", "--json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    // Node 2 can lease it now: fill node 2 until it holds that block (the
    // pool has 16 blocks of 16; node 2 already has one).
    let mut got = false;
    for k in 0..(15 * 16) {
        let _ = t.add(1, &format!("fill{k}"));
        if t.table119(1).contains(&b3[0]) {
            got = true;
            break;
        }
    }
    assert!(got, "node 2 leased the freed block {}", b3[0]);
}

/// The addresses of `pod`'s eth0 of one family ("-4" or "-6"), global only.
fn pod_ip_of(pod: &str, family: &str) -> String {
    String::from_utf8_lossy(
        &sh(&[
            "ip", "-n", pod, "-o", family, "addr", "show", "eth0", "scope", "global",
        ])
        .stdout,
    )
    .split_whitespace()
    .nth(3)
    .and_then(|a| a.split('/').next())
    .unwrap_or_default()
    .to_string()
}

#[test]
fn two_nodes_route_dual_stack_pods_over_bgp() {
    let mut t = two_nodes(true);
    // Node 1 keeps no idle block, so a release is visible.
    t.start_coild(0, "0");
    t.start_coild(1, "1");
    let p1 = t.add(0, "dual-a");
    let p2 = t.add(1, "dual-b");
    // Each node publishes one block of each family.
    let b1 = t.table119(0);
    let b2 = t.table119(1);
    assert_eq!(b1.len(), 2, "{b1:?}");
    assert_eq!(b2.len(), 2, "{b2:?}");
    for (i, blocks) in [(1, &b1), (0, &b2)] {
        for b in blocks.iter() {
            wait_until(&format!("node {} learns {b}", i + 1), 30, || {
                t.main_has(i, b)
            });
        }
    }
    for family in ["-4", "-6"] {
        let (ip1, ip2) = (pod_ip_of(&p1, family), pod_ip_of(&p2, family));
        assert!(!ip1.is_empty() && !ip2.is_empty(), "{family}: {ip1} {ip2}");
        wait_until(&format!("pod a reaches pod b over {ip2}"), 20, || {
            ping(&p1, &ip2)
        });
        assert!(ping(&p2, &ip1), "pod b reaches pod a over {ip1}");
    }
    // Node 1's only pod goes: both its blocks are released and withdrawn
    // from node 2's main tables.
    t.del(0, "dual-a", &p1);
    wait_until("node 1 releases its empty blocks", 30, || {
        t.table119(0).is_empty()
    });
    for b in &b1 {
        wait_until(&format!("node 2 forgets {b}"), 30, || !t.main_has(1, b));
    }
}

const CONTROLLER: &str = env!("CARGO_BIN_EXE_coil-controller");
