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

    fn table119(&self, i: usize) -> Vec<String> {
        String::from_utf8_lossy(
            &in_ns(&self.ns[i], &["ip", "route", "show", "table", "119"]).stdout,
        )
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
    }

    fn main_has(&self, i: usize, block: &str) -> bool {
        !String::from_utf8_lossy(&in_ns(&self.ns[i], &["ip", "route", "show", block]).stdout)
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

#[test]
fn two_nodes_route_pods_over_bgp() {
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
            ],
        );
    }
    let (a, b) = (format!("{}x", t.ns[0]), format!("{}x", t.ns[1]));
    ok(&[
        "ip", "link", "add", &a, "netns", &t.ns[0], "type", "veth", "peer", "name", &b, "netns",
        &t.ns[1],
    ]);
    ok(&[
        "ip",
        "-n",
        &t.ns[0],
        "addr",
        "add",
        "10.251.0.1/24",
        "dev",
        &a,
    ]);
    ok(&[
        "ip",
        "-n",
        &t.ns[1],
        "addr",
        "add",
        "10.251.0.2/24",
        "dev",
        &b,
    ]);
    ok(&["ip", "-n", &t.ns[0], "link", "set", &a, "up"]);
    ok(&["ip", "-n", &t.ns[1], "link", "set", &b, "up"]);

    // One etcd, on node 1, reachable from node 2 over the link.
    let etcd =
        coil::testkit::start_etcd_in_netns(&t.ns[0], t.dir.path(), Some("http://10.251.0.1:2379"))
            .expect("etcd");
    t.procs.push(Proc(Some(etcd)));
    let o = t.coilctl(&[
        "pool",
        "create",
        "default",
        "10.252.0.0/24",
        "--block-size",
        "4",
    ]);
    assert!(o.status.success(), "{o:?}");

    // BIRD on both nodes from the deploy/ template.
    let tmpl = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bird/bird.conf.tmpl"),
    )
    .expect("template");
    for i in 0..2 {
        let j = 1 - i;
        let conf = tmpl
            .replace("@ROUTER_ID@", &t.link[i])
            .replace("@LOCAL_IP@", &t.link[i])
            .replace("@LOCAL_AS@", &(64601 + i).to_string())
            .replace("@PEER_IP@", &t.link[j])
            .replace("@PEER_AS@", &(64601 + j).to_string())
            .replace("@TABLE@", "119");
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
    for i in 0..2 {
        let ctl = t
            .dir
            .path()
            .join(format!("bird{i}.ctl"))
            .display()
            .to_string();
        wait_until("BGP Established", 40, || {
            String::from_utf8_lossy(
                &sh(&["birdc", "-s", &ctl, "show", "protocols", "coil_peer"]).stdout,
            )
            .contains("Established")
        });
    }

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

const CONTROLLER: &str = env!("CARGO_BIN_EXE_coil-controller");
