//! Two nodes and one etcd, each in its own network namespace; node A is
//! cut off from etcd for longer than its liveness TTL plus the
//! controller's grace period. The regression this guards against: the
//! controller used to free A's block on liveness expiry and node B got the
//! address A's pod still held. Now A's block stays reserved (B's ADD gets
//! a clear exhaustion error), A keeps serving, and only an operator's
//! `coilctl node remove` frees the block; a removed node that comes back
//! serves nothing from it until `coilctl node readmit`. Root only.

mod common;

use std::path::Path;

use std::time::{Duration, Instant};

use common::*;

/// etcd's namespace `e` linked to node namespaces `a` and `b`.
struct Cluster {
    e: String,
    nodes: [String; 2],
    dir: tempfile::TempDir,
    coild: [Proc; 2],
    others: Vec<Proc>,
    pods: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.coild {
            c.kill();
        }
        for p in &mut self.others {
            p.kill();
        }
        for p in &self.pods {
            let _ = sh(&["ip", "netns", "del", p]);
        }
        for n in self.nodes.iter().chain(std::iter::once(&self.e)) {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

const NAMES: [&str; 2] = ["node-a", "node-b"];

impl Cluster {
    fn new() -> Cluster {
        let e = unique("e");
        let nodes = [unique("a"), unique("b")];
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Cluster {
            e: e.clone(),
            nodes: nodes.clone(),
            dir,
            coild: [Proc(None), Proc(None)],
            others: Vec::new(),
            pods: Vec::new(),
        };
        ok(&["ip", "netns", "add", &e]);
        ok(&["ip", "-n", &e, "link", "set", "lo", "up"]);
        for (i, n) in nodes.iter().enumerate() {
            ok(&["ip", "netns", "add", n]);
            ok(&["ip", "-n", n, "link", "set", "lo", "up"]);
            ok(&[
                "ip",
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
            let (ev, nv) = (format!("pe{i}"), format!("pn{i}"));
            ok(&[
                "ip", "link", "add", &ev, "netns", &e, "type", "veth", "peer", "name", &nv,
                "netns", n,
            ]);
            ok(&[
                "ip",
                "-n",
                &e,
                "addr",
                "add",
                &format!("10.252.{i}.1/24"),
                "dev",
                &ev,
            ]);
            ok(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("10.252.{i}.2/24"),
                "dev",
                &nv,
            ]);
            ok(&["ip", "-n", &e, "link", "set", &ev, "up"]);
            ok(&["ip", "-n", n, "link", "set", &nv, "up"]);
        }
        let etcd = coil_testkit::start_etcd_in_netns(
            &e,
            c.dir.path(),
            Some("http://10.252.0.1:2379,http://10.252.1.1:2379"),
        )
        .expect("etcd");
        c.others.push(Proc(Some(etcd)));
        c
    }

    fn endpoint(i: usize) -> String {
        format!("http://10.252.{i}.1:2379")
    }

    /// coilctl from etcd's namespace.
    fn coilctl(&self, args: &[&str]) -> std::process::Output {
        let mut v = vec![
            "ip",
            "netns",
            "exec",
            &self.e,
            COILCTL,
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn socket(&self, i: usize) -> String {
        self.dir
            .path()
            .join(format!("coild{i}.sock"))
            .display()
            .to_string()
    }

    fn start_coild(&mut self, i: usize, boot: &str) {
        let sock = self.socket(i);
        let _ = std::fs::remove_file(&sock);
        let boot_file = self.dir.path().join(format!("boot{i}"));
        std::fs::write(&boot_file, format!("{boot}\n")).expect("boot");
        let p = spawn_in(
            &self.nodes[i],
            &[
                COILD,
                "--store",
                "etcd",
                "--etcd-endpoints",
                &Cluster::endpoint(i),
                "--etcd-timeout",
                "1s",
                "--node-name",
                NAMES[i],
                "--state-dir",
                &self
                    .dir
                    .path()
                    .join(format!("state{i}"))
                    .display()
                    .to_string(),
                "--socket",
                &sock,
                "--boot-id-file",
                &boot_file.display().to_string(),
                "--resync-interval",
                "1s",
                "--liveness-ttl",
                "2s",
            ],
            &self.dir.path().join(format!("coild{i}.log")),
        );
        self.coild[i] = p;
        wait_until("coild ready", 20, || Path::new(&sock).exists());
    }

    /// coild's counters on node `i`.
    fn stats(&self, i: usize) -> serde_json::Value {
        use std::io::{Read, Write};
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.socket(i)) else {
            return serde_json::Value::Null;
        };
        let _ = s.write_all(br#"{"stats":{}}"#);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("coild{i}.log"))).unwrap_or_default()
    }

    fn cut(&self, i: usize, down: bool) {
        ok(&[
            "ip",
            "-n",
            &self.nodes[i],
            "link",
            "set",
            &format!("pn{i}"),
            if down { "down" } else { "up" },
        ]);
    }

    fn pod(&mut self) -> String {
        let p = unique("p");
        ok(&["ip", "netns", "add", &p]);
        self.pods.push(p.clone());
        p
    }

    fn add(&self, i: usize, pod: &str, cid: &str) -> Cni {
        cni(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &format!("/run/netns/{pod}")),
                ("CNI_IFNAME", "eth0"),
            ],
            format!(
                r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"coil","socket":"{}"}}"#,
                self.socket(i)
            )
            .as_bytes(),
        )
    }

    fn table119(&self, i: usize) -> String {
        let o = sh(&["ip", "-n", &self.nodes[i], "route", "show", "table", "119"]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn node_line(&self, node: &str) -> String {
        let o = self.coilctl(&["node", "list"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or("")
            .to_string()
    }
}

/// The address on a pod's eth0, the live truth.
fn pod_addr(pod: &str) -> String {
    let o = sh(&["ip", "-n", pod, "-o", "-4", "addr", "show", "eth0"]);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(3)
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_partition_longer_than_ttl_and_grace_never_duplicates_an_address() {
    let mut c = Cluster::new();
    // One block of four addresses in the whole pool.
    let o = c.coilctl(&[
        "pool",
        "create",
        "default",
        "10.96.0.0/30",
        "--block-size",
        "2",
    ]);
    assert!(o.status.success(), "{o:?}");
    c.start_coild(0, "a-1");
    c.start_coild(1, "b-1");
    let ctl = spawn_in(
        &c.e,
        &[
            CONTROLLER,
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--grace-period",
            "2s",
            "--interval",
            "300ms",
            "--identity",
            "partition-test",
        ],
        &c.dir.path().join("controller.log"),
    );
    c.others.push(ctl);

    let pa = c.pod();
    let a = c.add(0, &pa, "pod-a");
    assert_eq!(a.code, 0, "{a:?}");
    let addr_a = pod_addr(&pa);
    assert!(addr_a.starts_with("10.96.0."), "{addr_a}");

    // Cut A off from etcd for well over TTL (2 s) + grace (2 s).
    c.cut(0, true);
    let t = Instant::now();
    wait_until("the controller reports node-a unreachable", 20, || {
        c.node_line("node-a").contains("unreachable since")
    });
    // A keeps serving from its leased block: no etcd on the hot path.
    let pa2 = c.pod();
    let a2 = c.add(0, &pa2, "pod-a2");
    assert_eq!(a2.code, 0, "A stopped serving while partitioned: {a2:?}");
    // B finds the pool exhausted, however long A stays away.
    let mut tries = 0;
    while t.elapsed() < Duration::from_secs(12) {
        let pb = c.pod();
        let b = c.add(1, &pb, &format!("pod-b{tries}"));
        assert_eq!(b.err(), Some(101), "B's ADD during the partition: {b:?}");
        assert!(
            b.out["msg"].as_str().unwrap_or("").contains("exhausted"),
            "{b:?}"
        );
        tries += 1;
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(tries >= 5);
    c.cut(0, false);
    wait_until("node-a is alive again", 20, || {
        c.node_line("node-a").contains("alive")
    });
    // A's pods kept their addresses and A still publishes its block.
    assert_eq!(pod_addr(&pa), addr_a);
    assert!(c.table119(0).contains("10.96.0.0/30"), "{}", c.table119(0));
    assert!(c.table119(1).trim().is_empty(), "{}", c.table119(1));
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.table119(0).contains("10.96.0.0/30"), "{}", c.log(0));

    // Now A is powered off for good: its coild dies, its pods with it.
    c.coild[0].kill();
    for p in [&pa, &pa2] {
        let _ = sh(&["ip", "netns", "del", p]);
    }
    wait_until("node-a is unreachable", 20, || {
        c.node_line("node-a").contains("unreachable")
    });
    // The operator's word frees the block; B may lease it now.
    let o = c.coilctl(&["node", "remove", "node-a"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        c.node_line("node-a").contains("removed"),
        "{}",
        c.node_line("node-a")
    );
    let pb = c.pod();
    let b = c.add(1, &pb, "pod-b-after");
    assert_eq!(b.code, 0, "{b:?}");
    assert!(c.table119(1).contains("10.96.0.0/30"));

    // A comes back (a power cycle: new boot), still cut off from etcd: it
    // cannot see its fence yet, so it serves nothing from its old block
    // until the store confirms it (the chaos harness found it serving).
    c.cut(0, true);
    c.start_coild(0, "a-2");
    let pa_early = c.pod();
    let early = c.add(0, &pa_early, "pod-a-early");
    assert_eq!(early.err(), Some(11), "{early:?}");
    assert!(
        early.out["msg"].as_str().unwrap_or("").contains("rebooted"),
        "{early:?}"
    );
    assert!(pod_addr(&pa_early).is_empty());
    // Killed and restarted before the store answered, it still waits: the
    // journal names the new boot only once the store confirmed it.
    c.coild[0].kill();
    c.start_coild(0, "a-2");
    let early = c.add(0, &pa_early, "pod-a-early");
    assert_eq!(early.err(), Some(11), "after a restart: {early:?}");
    assert!(pod_addr(&pa_early).is_empty());
    c.cut(0, false);
    wait_until("A sees its removal fence", 20, || {
        c.stats(0)["removed"] == true
    });
    assert!(
        !c.table119(0).contains("10.96.0.0/30"),
        "A publishes its old block: {}",
        c.table119(0)
    );
    let pa3 = c.pod();
    let a3 = c.add(0, &pa3, "pod-a3");
    assert_eq!(a3.err(), Some(11), "{a3:?}");
    assert!(
        a3.out["msg"].as_str().unwrap_or("").contains("readmit"),
        "{a3:?}"
    );
    // Re-admitted, it leases again: the pool's only block is B's now, so
    // A's next ADD is refused as exhausted, never given B's address.
    let o = c.coilctl(&["node", "readmit", "node-a"]);
    assert!(o.status.success(), "{o:?}");
    wait_until("A notices the re-admission", 20, || {
        let r = c.add(0, &pa3, "probe");
        r.err() == Some(101)
    });
    assert_ne!(pod_addr(&pb), "");
}

const CONTROLLER: &str = env!("CARGO_BIN_EXE_coil-controller");
