//! coild, coilctl and coil-controller (the real binaries, with the real
//! `coil` plugin) against a 3-member etcd cluster with client-certificate
//! TLS (coil_testkit::EtcdCluster), through a member killed, a member
//! partitioned away, quorum lost and regained; and a wrong client
//! certificate. Needs root; everything lives in namespaces the tests
//! create.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coil_testkit::EtcdCluster;
use common::{ok, Cni, EtcdTls, Node, StoreMode};
use serde_json::Value;

const CONTROLLER: &str = env!("CARGO_BIN_EXE_coil-controller");
/// Addresses per block (--block-size 2).
const PER_BLOCK: usize = 4;

fn tls(c: &EtcdCluster) -> EtcdTls {
    EtcdTls {
        ca: c.tls.ca.clone(),
        cert: c.tls.cert.clone(),
        key: c.tls.key.clone(),
    }
}

/// A node whose coild reaches every member over TLS; with `subnet`, it
/// first creates the pool "default" of 4-address blocks there.
fn node(c: &mut EtcdCluster, subnet: Option<&str>) -> Node {
    let mode = StoreMode::Etcd {
        endpoint: c.endpoints_csv(),
        prefix: "/coil/".into(),
    };
    let pool;
    let pools: &[&[&str]] = match subnet {
        Some(s) => {
            pool = ["pool", "create", "default", s, "--block-size", "2"];
            &[&pool]
        }
        None => &[],
    };
    Node::new_with(mode, pools, |n| {
        c.attach(&n.netns).expect("attach the node to the hub");
        n.etcd_tls = Some(tls(c));
    })
}

/// Blocks the node leased, as published in its table 119 (no etcd).
fn blocks(n: &Node) -> usize {
    // The table does not exist before the first block.
    let o = common::sh(&["ip", "-n", &n.netns, "route", "show", "table", "119"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// ADDs a new pod, retrying "try again later" (code 11) as a runtime
/// would, for at most `limit`; the result, the time it took and the
/// number of calls.
fn add_within(n: &mut Node, cid: &str, limit: Duration) -> (Cni, Duration, usize) {
    let p = n.pod();
    let t = Instant::now();
    for k in 1..100 {
        let r = n.add(&p, cid);
        if r.err() != Some(11) || t.elapsed() > limit {
            return (r, t.elapsed(), k);
        }
        eprintln!("ADD {cid}: try again later: {}", r.raw);
        std::thread::sleep(Duration::from_millis(200));
    }
    (n.add(&p, cid), t.elapsed(), 100)
}

/// ADDs pods until every leased block is full (none of these ADDs needs
/// a new block); how many pods the node has then.
fn fill(n: &mut Node, pods: &mut usize, tag: &str) {
    let cap = blocks(n) * PER_BLOCK;
    while *pods < cap {
        let (r, _, _) = add_within(n, &format!("{tag}{pods}"), Duration::ZERO);
        assert_eq!(r.code, 0, "ADD with room: {r:?}; log: {}", n.log());
        *pods += 1;
    }
    assert_eq!(blocks(n), cap / PER_BLOCK, "filling leased no block");
}

/// An ADD that needs a new block succeeds within `limit` (and leases one).
fn add_new_block(n: &mut Node, pods: &mut usize, cid: &str, limit: Duration, what: &str) {
    fill(n, pods, &format!("{cid}f"));
    let before = blocks(n);
    let (r, took, calls) = add_within(n, cid, limit);
    assert_eq!(r.code, 0, "{what}: {r:?} after {took:?}; log: {}", n.log());
    *pods += 1;
    assert_eq!(blocks(n), before + 1, "{what}: a new block was leased");
    eprintln!("{what}: ADD with a new block took {took:?} ({calls} calls)");
}

/// coilctl over TLS answers (lists the pools) within `limit`.
fn coilctl_works(n: &Node, limit: Duration, what: &str) {
    let t = Instant::now();
    loop {
        let o = n.coilctl(&["pool", "list", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if o.status.success() && v.to_string().contains("default") {
            return;
        }
        assert!(t.elapsed() < limit, "{what}: coilctl: {o:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A namespace on the hub, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(c: &mut EtcdCluster) -> Netns {
        let n = Netns(common::unique("c"));
        ok(&["ip", "netns", "add", &n.0]);
        ok(&["ip", "-n", &n.0, "link", "set", "lo", "up"]);
        c.attach(&n.0).expect("attach");
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = common::sh(&["ip", "netns", "del", &self.0]);
    }
}

/// coil-controller in its own namespace on the hub; killed (by pid) on
/// drop.
struct Controller {
    child: Child,
    _netns: Netns,
}

impl Controller {
    fn start(c: &mut EtcdCluster) -> Controller {
        let netns = Netns::new(c);
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.0, CONTROLLER])
            .args([
                "--etcd-endpoints",
                &c.endpoints_csv(),
                "--etcd-timeout",
                "1s",
                "--grace-period",
                "1s",
                "--interval",
                "200ms",
                "--election-ttl",
                "3s",
                "--identity",
                "cluster-test",
            ])
            .env("COIL_CONTROLLER_ETCD_TLS_CA", &c.tls.ca)
            .env("COIL_CONTROLLER_ETCD_TLS_CERT", &c.tls.cert)
            .env("COIL_CONTROLLER_ETCD_TLS_KEY", &c.tls.key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start coil-controller");
        Controller {
            child,
            _netns: netns,
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_node_keeps_working_through_member_failures() {
    let mut c = EtcdCluster::new().expect("etcd cluster");
    let mut n = node(&mut c, Some("10.89.0.0/24"));
    coilctl_works(&n, Duration::from_secs(10), "healthy cluster");
    let mut pods = 0;
    add_new_block(&mut n, &mut pods, "a", Duration::ZERO, "healthy");

    // One member killed: ADD leasing a block and coilctl still work
    // (a request racing the kill may fail once: the runtime retries).
    c.kill(0);
    add_new_block(
        &mut n,
        &mut pods,
        "k",
        Duration::from_secs(5),
        "member killed",
    );
    coilctl_works(&n, Duration::from_secs(5), "member killed");

    // The controller works with a member down: it reports a node that
    // died unreachable (never frees its blocks for that), and the
    // operator's `coilctl node remove` frees them, over TLS with a member
    // down.
    let ctl = Controller::start(&mut c);
    let mut ghost = node(&mut c, None);
    let mut ghost_pods = 0;
    add_new_block(
        &mut ghost,
        &mut ghost_pods,
        "g",
        Duration::from_secs(5),
        "ghost",
    );
    let ghost_name = ghost.name.clone();
    ghost.kill9();
    let t = Instant::now();
    loop {
        let o = n.coilctl(&["node", "list"]);
        let listed = String::from_utf8_lossy(&o.stdout).into_owned();
        if listed
            .lines()
            .any(|l| l.starts_with(&ghost_name) && l.contains("unreachable since"))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the controller never reported the dead node: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let o = n.coilctl(&["node", "blocks", &ghost_name, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert!(
        v.as_array().is_some_and(|a| !a.is_empty()),
        "blocks freed on liveness expiry: {o:?}"
    );
    let o = n.coilctl(&["node", "remove", &ghost_name]);
    assert!(o.status.success(), "{o:?}");
    let o = n.coilctl(&["node", "blocks", &ghost_name, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert!(v.as_array().is_some_and(Vec::is_empty), "{o:?}");
    drop(ghost);
    drop(ctl);

    c.start(0).expect("restart member 0");
    c.wait_healthy(&[0, 1, 2], Duration::from_secs(30))
        .expect("healthy again");

    // Another member partitioned away (connections to it hang).
    c.partition(1).expect("partition");
    add_new_block(
        &mut n,
        &mut pods,
        "p",
        Duration::from_secs(8),
        "member partitioned",
    );
    coilctl_works(&n, Duration::from_secs(8), "member partitioned");
    // coild restarts (startup recovery reads the store) while it is cut off.
    n.stop();
    n.start();
    add_new_block(
        &mut n,
        &mut pods,
        "r",
        Duration::from_secs(8),
        "coild restarted, member partitioned",
    );
    c.heal(1).expect("heal");
    c.wait_healthy(&[0, 1, 2], Duration::from_secs(30))
        .expect("healthy again");

    // Quorum lost: an ADD with room in a leased block still succeeds (no
    // etcd on that path); one needing a new block fails as "try again
    // later", promptly.
    add_new_block(
        &mut n,
        &mut pods,
        "q",
        Duration::from_secs(10),
        "before quorum loss",
    );
    let room = blocks(&n) * PER_BLOCK - pods;
    assert!(room > 0);
    c.kill(2);
    c.partition(0).expect("partition");
    for i in 0..room {
        let t = Instant::now();
        let (r, _, _) = add_within(&mut n, &format!("q-room{i}"), Duration::ZERO);
        assert_eq!(
            r.code,
            0,
            "ADD with room, no quorum: {r:?}; log: {}",
            n.log()
        );
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "took {:?}",
            t.elapsed()
        );
        pods += 1;
    }
    let before = blocks(&n);
    assert_eq!(pods, before * PER_BLOCK, "the leased blocks are full");
    let q2 = n.pod();
    let t = Instant::now();
    let r = n.add(&q2, "q-block");
    let took = t.elapsed();
    assert_eq!(r.err(), Some(11), "no quorum: {r:?}; log: {}", n.log());
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(blocks(&n), before);
    let t = Instant::now();
    let o = n.coilctl(&["pool", "list", "--json"]);
    let took = t.elapsed();
    assert!(!o.status.success(), "coilctl fails without quorum: {o:?}");
    assert!(took < Duration::from_secs(10), "coilctl took {took:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unavailable"), "{o:?}");
    for ep in c.endpoints() {
        assert!(err.contains(&ep), "{ep} not named: {err}");
    }

    // Healed: it works again.
    c.start(2).expect("restart member 2");
    c.heal(0).expect("heal");
    c.wait_healthy(&[0, 1, 2], Duration::from_secs(30))
        .expect("healthy again");
    add_new_block(&mut n, &mut pods, "h", Duration::from_secs(10), "healed");
    coilctl_works(&n, Duration::from_secs(10), "healed");
}

#[test]
fn a_wrong_client_certificate_is_a_clear_tls_error() {
    let mut c = EtcdCluster::new().expect("etcd cluster");
    let mut n = node(&mut c, Some("10.90.0.0/24"));
    coilctl_works(&n, Duration::from_secs(10), "good certificate");
    let good = n.etcd_tls.clone().expect("tls");
    let rogue = EtcdTls {
        cert: c.tls.rogue_cert.clone(),
        key: c.tls.rogue_key.clone(),
        ..good.clone()
    };
    // coilctl: a rogue certificate, then none.
    for (what, flags) in [
        (
            "rogue certificate",
            vec![
                "--etcd-tls-cert".to_string(),
                rogue.cert.display().to_string(),
                "--etcd-tls-key".to_string(),
                rogue.key.display().to_string(),
            ],
        ),
        ("no certificate", vec![]),
    ] {
        let t = Instant::now();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.netns, common::COILCTL])
            .env_clear()
            .args(["--etcd-endpoints", &c.endpoints_csv()])
            .arg("--etcd-tls-ca")
            .arg(&good.ca)
            .args(&flags)
            .args(["pool", "list"]);
        let o = cmd.output().expect("coilctl");
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(!o.status.success(), "{what}: {o:?}");
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        assert!(
            err.contains("certificate"),
            "{what}: not a clear TLS error: {o:?}"
        );
    }
    // coild with a rogue certificate: it stops at startup saying why (the
    // member refused the certificate), or, when every member only closed
    // the connection, serves and fails the ADD naming the certificate.
    n.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("coild.sock");
    std::fs::write(dir.path().join("boot_id"), "b\n").expect("boot id");
    let log = std::fs::File::create(dir.path().join("coild.log")).expect("log");
    let t = Instant::now();
    let mut coild = Command::new("ip")
        .args(["netns", "exec", &n.netns, common::COILD])
        .args([
            "--node-name",
            "rogue",
            "--store",
            "etcd",
            "--etcd-timeout",
            "1s",
        ])
        .args(["--etcd-endpoints", &c.endpoints_csv()])
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--socket")
        .arg(&socket)
        .arg("--boot-id-file")
        .arg(dir.path().join("boot_id"))
        .env("COILD_ETCD_TLS_CA", &good.ca)
        .env("COILD_ETCD_TLS_CERT", &rogue.cert)
        .env("COILD_ETCD_TLS_KEY", &rogue.key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("coild");
    let read_log = || std::fs::read_to_string(dir.path().join("coild.log")).unwrap_or_default();
    let outcome = loop {
        if let Ok(Some(st)) = coild.try_wait() {
            break Err(st);
        }
        if socket.exists() {
            break Ok(());
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = coild.kill();
            let _ = coild.wait();
            panic!("coild neither served nor stopped: {}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match outcome {
        Err(st) => {
            assert!(!st.success(), "{}", read_log());
            assert!(
                read_log().to_lowercase().contains("certificate"),
                "not a clear TLS error: {}",
                read_log()
            );
        }
        Ok(()) => {
            let p = n.pod();
            let conf = format!(
                r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"coil","socket":"{}"}}"#,
                socket.display()
            );
            let netns = format!("/run/netns/{p}");
            let r = common::cni(
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "rogue"),
                    ("CNI_NETNS", &netns),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_PATH", "/opt/cni/bin"),
                ],
                conf.as_bytes(),
            );
            let _ = coild.kill();
            let _ = coild.wait();
            // 100 when the member's refusal arrives (a bad configuration),
            // 11 when only closed connections do (maybe transient).
            assert!(matches!(r.err(), Some(11) | Some(100)), "{r:?}");
            let msg = format!("{} {}", r.raw, read_log()).to_lowercase();
            assert!(msg.contains("certificate"), "not a clear TLS error: {r:?}");
        }
    }
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}
