//! The CNI plugin and coild against the real kernel: every test runs coild
//! in a network namespace it creates, pods are network namespaces, and the
//! real `coil` binary is called with CNI environment and netconf. Root only
//! (scripts/test and CI run as root).

mod common;

use common::*;
use serde_json::Value;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn default_pool(subnet: &str, bs: &str) -> Vec<String> {
    ["pool", "create", "default", subnet, "--block-size", bs]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn node(pools: &[Vec<String>]) -> Node {
    let p: Vec<Vec<&str>> = pools
        .iter()
        .map(|v| v.iter().map(String::as_str).collect())
        .collect();
    let refs: Vec<&[&str]> = p.iter().map(|v| v.as_slice()).collect();
    Node::new(StoreMode::Embedded, &refs)
}

#[test]
fn every_version_add_check_del() {
    let mut n = node(&[default_pool("10.90.0.0/24", "4")]);
    let mut seen = Vec::new();
    for (i, v) in VERSIONS.iter().enumerate() {
        let pod = n.pod();
        let cid = format!("ver{i}");
        let r = n.call("ADD", v, &pod, &cid, "eth0", "");
        assert_eq!(r.code, 0, "{v}: {r:?}");
        assert_eq!(r.out["cniVersion"], *v);
        let ip = r.ip();
        assert!(
            ip.starts_with("10.90.0.") && ip.ends_with("/32"),
            "{v}: {ip}"
        );
        assert_eq!(r.out["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(r.out["ips"][0]["interface"], 1);
        assert_eq!(
            r.out["interfaces"][1]["sandbox"],
            format!("/run/netns/{pod}")
        );
        assert_eq!(r.out["routes"][0]["dst"], "0.0.0.0/0");
        match *v {
            "0.3.0" | "0.3.1" | "0.4.0" => assert_eq!(r.out["ips"][0]["version"], "4"),
            _ => assert!(r.out["ips"][0].get("version").is_none()),
        }
        assert!(!seen.contains(&ip), "address {ip} handed out twice");
        seen.push(ip.clone());
        // The kernel holds what the result says.
        let addr = ok(&["ip", "-n", &pod, "-o", "addr", "show", "eth0"]);
        assert!(addr.contains(&ip), "{addr}");
        let routes = ok(&["ip", "-n", &pod, "route"]);
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        let c = n.call("CHECK", v, &pod, &cid, "eth0", "");
        if *v == "0.3.0" || *v == "0.3.1" {
            assert_eq!(c.err(), Some(1), "CHECK needs 0.4.0: {c:?}");
        } else {
            assert_eq!(c.code, 0, "{v}: {c:?}");
            assert!(c.raw.trim().is_empty(), "CHECK prints nothing: {c:?}");
        }
        let d = n.call("DEL", v, &pod, &cid, "eth0", "");
        assert_eq!(d.code, 0, "{v}: {d:?}");
        assert!(d.raw.trim().is_empty());
        let d2 = n.call("DEL", v, &pod, &cid, "eth0", "");
        assert_eq!(d2.code, 0, "second DEL: {d2:?}");
    }
    assert!(n.wait_links(0).is_empty(), "{:?}", n.coil_links());
    let v = cni(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(v.code, 0);
    assert_eq!(v.out["cniVersion"], "0.4.0");
    assert_eq!(
        v.out["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    n.stop();
}

#[test]
fn pods_reach_each_other_and_the_node_and_blocks_are_published() {
    let mut n = node(&[default_pool("10.91.0.0/24", "4")]);
    let a = n.pod();
    let b = n.pod();
    let ra = n.add(&a, "pa");
    let rb = n.add(&b, "pb");
    assert_eq!(ra.code, 0, "{ra:?}");
    assert_eq!(rb.code, 0, "{rb:?}");
    let ipb = rb.ip().trim_end_matches("/32").to_string();
    assert!(ping(&a, &ipb), "pod a cannot reach pod b at {ipb}");
    assert!(ping(&a, "169.254.1.1"), "pod a cannot reach the node");
    // One block leased, published as BLOCK dev lo proto 30 in table 119.
    let t = n.table119();
    assert_eq!(t.lines().count(), 1, "{t}");
    assert!(t.contains("dev lo proto 30"), "{t}");
    let block = t.split_whitespace().next().unwrap_or_default().to_string();
    let net: ipnet::IpNet = block.parse().expect("block");
    assert!(net.contains(&ipb.parse::<std::net::IpAddr>().expect("ip")));
    // coilctl reaches the embedded store through coild's socket.
    let o = n.coilctl(&["pool", "show", "default", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["leased"], 1, "{v}");
    assert_eq!(v["leases"][0]["block"], block.as_str());
    assert_eq!(v["leases"][0]["node"], n.name.as_str());
    // Host veths carry the alias naming the attachment.
    let links = ok(&["ip", "-n", &n.netns, "-d", "link", "show"]);
    assert!(
        links.contains("alias coil:eth0:k8s-pod-network:pa"),
        "{links}"
    );
}

#[test]
fn add_twice_returns_the_same_result() {
    let mut n = node(&[default_pool("10.92.0.0/24", "4")]);
    let p = n.pod();
    let r1 = n.add(&p, "same");
    let r2 = n.add(&p, "same");
    assert_eq!(r1.code, 0, "{r1:?}");
    assert_eq!(r1.out, r2.out);
    assert_eq!(n.coil_links().len(), 1);
}

#[test]
fn del_without_netns_and_after_the_netns_is_gone() {
    let mut n = node(&[default_pool("10.93.0.0/24", "4")]);
    let p1 = n.pod();
    let p2 = n.pod();
    assert_eq!(n.add(&p1, "c1").code, 0);
    assert_eq!(n.add(&p2, "c2").code, 0);
    // containerd's `ctr run --cni` calls DEL with an empty CNI_NETNS.
    let d = n.call("DEL", "1.0.0", "", "c1", "eth0", "");
    assert_eq!(d.code, 0, "{d:?}");
    // The runtime deleted the netns before DEL.
    ok(&["ip", "netns", "del", &p2]);
    let d = n.del(&p2, "c2");
    assert_eq!(d.code, 0, "{d:?}");
    assert!(n.wait_links(0).is_empty(), "{:?}", n.coil_links());
    // Both addresses are free again: a pool of one block of 16 serves 16.
    for i in 0..16 {
        let p = n.pod();
        let r = n.add(&p, &format!("again{i}"));
        assert_eq!(r.code, 0, "{i}: {r:?}");
    }
}

#[test]
fn check_reports_a_deleted_route() {
    let mut n = node(&[default_pool("10.94.0.0/24", "4")]);
    let p = n.pod();
    assert_eq!(n.add(&p, "chk").code, 0);
    let c = n.call("CHECK", "1.0.0", &p, "chk", "eth0", "");
    assert_eq!(c.code, 0, "{c:?}");
    ok(&["ip", "-n", &p, "route", "del", "default"]);
    let c = n.call("CHECK", "1.0.0", &p, "chk", "eth0", "");
    assert_eq!(c.err(), Some(107), "{c:?}");
    assert!(
        c.out["msg"]
            .as_str()
            .unwrap_or("")
            .contains("default route"),
        "{c:?}"
    );
    let c = n.call("CHECK", "1.0.0", &p, "unknown", "eth0", "");
    assert_eq!(c.err(), Some(107), "{c:?}");
}

#[test]
fn gc_releases_what_is_not_valid() {
    let mut n = node(&[default_pool("10.95.0.0/24", "4")]);
    let pods: Vec<String> = (0..3).map(|_| n.pod()).collect();
    for (i, p) in pods.iter().enumerate() {
        assert_eq!(n.add(p, &format!("gc{i}")).code, 0);
    }
    let gc = |network: &str, list: &str| {
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"{network}","socket":"{}"{list}}}"#,
            n.socket.display()
        );
        cni(&[("CNI_COMMAND", "GC")], conf.as_bytes())
    };
    // Another network's GC (multus, a second podman network) and a GC
    // without the list release nothing.
    let r = gc("other", r#","cni.dev/valid-attachments":[]"#);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(n.coil_links().len(), 3, "another network's GC took pods");
    let r = gc("k8s-pod-network", "");
    assert_eq!(r.err(), Some(7), "{r:?}");
    assert!(
        r.out["msg"]
            .as_str()
            .unwrap_or("")
            .contains("valid-attachments"),
        "{r:?}"
    );
    assert_eq!(n.coil_links().len(), 3, "a GC without its list took pods");
    // The network's own GC releases what its list leaves out.
    let r = gc(
        "k8s-pod-network",
        r#","cni.dev/valid-attachments":[{"containerID":"gc1","ifname":"eth0"}]"#,
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(n.coil_links().len(), 1);
    let c = n.call("CHECK", "1.1.0", &pods[1], "gc1", "eth0", "");
    assert_eq!(c.code, 0, "the valid attachment survives: {c:?}");
    let c = n.call("CHECK", "1.1.0", &pods[0], "gc0", "eth0", "");
    assert_eq!(c.err(), Some(107));
}

#[test]
fn status_and_exhaustion() {
    // One block of 4 addresses in the whole pool.
    let mut n = node(&[default_pool("10.96.0.0/30", "2")]);
    let st = cni(&[("CNI_COMMAND", "STATUS")], n.conf("1.1.0").as_bytes());
    assert_eq!(st.code, 0, "{st:?}");
    for i in 0..4 {
        let p = n.pod();
        assert_eq!(n.add(&p, &format!("ex{i}")).code, 0);
    }
    let p = n.pod();
    let r = n.add(&p, "ex-last");
    assert_eq!(r.err(), Some(101), "exhaustion, not a generic error: {r:?}");
    assert!(
        r.out["msg"].as_str().unwrap_or("").contains("exhausted"),
        "{r:?}"
    );
    // Nothing left behind by the failed ADD.
    assert_eq!(n.coil_links().len(), 4);
    assert!(ok(&["ip", "-n", &p, "link"]).lines().count() <= 2);
}

#[test]
fn namespace_pools_serve_their_namespace() {
    let mut n = node(&[
        default_pool("10.97.0.0/24", "4"),
        [
            "pool",
            "create",
            "team-a",
            "10.98.0.0/24",
            "--block-size",
            "4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ]);
    let p = n.pod();
    let r = n.call(
        "ADD",
        "1.0.0",
        &p,
        "ns1",
        "eth0",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=ns1",
    );
    assert!(r.ip().starts_with("10.98.0."), "{r:?}");
    let p = n.pod();
    let r = n.call(
        "ADD",
        "1.0.0",
        &p,
        "ns2",
        "eth0",
        "K8S_POD_NAME=x;K8S_POD_NAMESPACE=other",
    );
    assert!(r.ip().starts_with("10.97.0."), "{r:?}");
    // podman: no namespace at all.
    let p = n.pod();
    let r = n.call("ADD", "1.0.0", &p, "ns3", "eth0", "");
    assert!(r.ip().starts_with("10.97.0."), "{r:?}");
    assert_eq!(n.table119().lines().count(), 2, "{}", n.table119());
}

#[test]
fn ipv6_pools_work() {
    let mut n = node(&[default_pool("fd00:90::/112", "8")]);
    let p = n.pod();
    let r = n.add(&p, "v6");
    assert_eq!(r.code, 0, "{r:?}");
    let ip = r.ip();
    assert!(ip.starts_with("fd00:90::") && ip.ends_with("/128"), "{ip}");
    assert_eq!(r.out["ips"][0]["gateway"], "fe80::1");
    assert_eq!(r.out["routes"][0]["dst"], "::/0");
    let routes = ok(&["ip", "-6", "-n", &p, "route"]);
    assert!(routes.contains("default via fe80::1 dev eth0"), "{routes}");
    let addrs = ok(&["ip", "-6", "-n", &p, "addr", "show", "eth0"]);
    assert!(addrs.contains(ip.trim_end_matches("/128")), "{addrs}");
    let t = ok(&["ip", "-6", "-n", &n.netns, "route", "show", "table", "119"]);
    assert!(t.contains("/120 dev lo proto 30"), "{t}");
    let block: ipnet::IpNet = t
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .expect("block");
    assert!(block.contains(
        &ip.trim_end_matches("/128")
            .parse::<std::net::IpAddr>()
            .expect("ip")
    ));
    let c = n.call("CHECK", "1.0.0", &p, "v6", "eth0", "");
    assert_eq!(c.code, 0, "{c:?}");
    assert_eq!(n.del(&p, "v6").code, 0);
}

fn dual_pool(v4: &str, v6: &str, bs: &str, bs6: &str) -> Vec<String> {
    [
        "pool",
        "create",
        "default",
        v4,
        "--ipv6",
        v6,
        "--block-size",
        bs,
        "--ipv6-block-size",
        bs6,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn dual_stack_pods_get_one_address_of_each_family() {
    let mut n = node(&[dual_pool("10.89.0.0/24", "fd00:89::/112", "4", "8")]);
    let mut seen = Vec::new();
    for (i, v) in VERSIONS.iter().enumerate() {
        let pod = n.pod();
        let cid = format!("dual{i}");
        let r = n.call("ADD", v, &pod, &cid, "eth0", "");
        assert_eq!(r.code, 0, "{v}: {r:?}");
        let ips_ = r.out["ips"].as_array().cloned().unwrap_or_default();
        assert_eq!(ips_.len(), 2, "{v}: {r:?}");
        let a4 = ips_[0]["address"].as_str().unwrap_or_default();
        let a6 = ips_[1]["address"].as_str().unwrap_or_default();
        assert!(
            a4.starts_with("10.89.0.") && a4.ends_with("/32"),
            "{v}: {a4}"
        );
        assert!(
            a6.starts_with("fd00:89::") && a6.ends_with("/128"),
            "{v}: {a6}"
        );
        assert_eq!(ips_[0]["gateway"], "169.254.1.1");
        assert_eq!(ips_[1]["gateway"], "fe80::1");
        assert_eq!(ips_[1]["interface"], 1);
        match *v {
            "0.3.0" | "0.3.1" | "0.4.0" => {
                assert_eq!(ips_[0]["version"], "4");
                assert_eq!(ips_[1]["version"], "6");
            }
            _ => assert!(ips_[1].get("version").is_none()),
        }
        let dsts: Vec<&str> = r.out["routes"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["dst"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(dsts, vec!["0.0.0.0/0", "::/0"], "{v}: {r:?}");
        for a in r.ips() {
            assert!(!seen.contains(&a), "address {a} handed out twice");
            seen.push(a);
        }
        // The kernel holds what the result says.
        let addrs = ok(&["ip", "-n", &pod, "-o", "addr", "show", "eth0"]);
        for a in r.ips() {
            assert!(addrs.contains(&a), "{addrs}");
        }
        let r6 = ok(&["ip", "-6", "-n", &pod, "route"]);
        assert!(r6.contains("default via fe80::1 dev eth0"), "{r6}");
        if *v != "0.3.0" && *v != "0.3.1" {
            let c = n.call("CHECK", v, &pod, &cid, "eth0", "");
            assert_eq!(c.code, 0, "{v}: {c:?}");
        }
    }
    // Two pods reach each other over both families; the node publishes
    // one block of each family in table 119.
    let (a, b) = (n.pod(), n.pod());
    let ra = n.add(&a, "pa");
    let rb = n.add(&b, "pb");
    assert_eq!((ra.code, rb.code), (0, 0), "{ra:?} {rb:?}");
    for ip in rb.ips() {
        assert!(ping(&a, &ip), "pod a cannot reach pod b at {ip}");
    }
    let t4 = n.table119();
    assert_eq!(t4.lines().count(), 1, "{t4}");
    let t6 = ok(&["ip", "-6", "-n", &n.netns, "route", "show", "table", "119"]);
    assert_eq!(t6.lines().count(), 1, "{t6}");
    assert!(t6.contains("/120 dev lo proto 30"), "{t6}");
    // The address index and coilctl know the IPv6 address's pod.
    let v6 = rb.ips()[1].clone();
    n.wait_for("the IPv6 address in the index", 10, |n| {
        let o = n.coilctl(&["address", "info", &v6, "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        v["assignment"]["container_id"] == "pb"
    });
    let o = n.coilctl(&["pool", "show", "default", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["families"], serde_json::json!(["ipv4", "ipv6"]), "{v}");
    assert_eq!(v["leased"], 2, "{v}");
    // DEL takes both away, and the host routes with them.
    assert_eq!(n.del(&b, "pb").code, 0);
    let host6 = ok(&["ip", "-6", "-n", &n.netns, "route"]);
    assert!(!host6.contains(&v6), "{host6}");
    n.stop();
}

#[test]
fn exhausting_one_family_takes_nothing_from_the_other() {
    // IPv4: one block of 4 addresses; IPv6: one block of 2.
    let mut n = node(&[dual_pool("10.88.0.0/30", "fd00:88::/127", "2", "1")]);
    let (p1, p2) = (n.pod(), n.pod());
    assert_eq!(n.add(&p1, "ex1").code, 0);
    assert_eq!(n.add(&p2, "ex2").code, 0);
    // Three ADDs fail on IPv6. Had each kept the IPv4 address it reserved
    // first, the IPv4 block (2 left) would run out and the third would
    // fail on IPv4.
    for i in 0..3 {
        let p = n.pod();
        let r = n.add(&p, &format!("ex-fail{i}"));
        assert_eq!(r.err(), Some(101), "{r:?}");
        let msg = r.out["msg"].as_str().unwrap_or("").to_string();
        assert!(msg.contains("exhausted") && msg.contains("ipv6"), "{msg}");
        assert!(ok(&["ip", "-n", &p, "link"]).lines().count() <= 2);
    }
    assert_eq!(n.coil_links().len(), 2);
    // With an IPv6 address free again (once p1's veth is torn down), the
    // next pod gets both.
    assert_eq!(n.del(&p1, "ex1").code, 0);
    let p3 = n.pod();
    let mut r = n.add(&p3, "ex3");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r.code != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        r = n.add(&p3, "ex3");
    }
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.ips().len(), 2, "{r:?}");
    n.stop();
}

#[test]
fn bad_input_gets_its_code_and_leaves_nothing() {
    let mut n = node(&[default_pool("10.99.0.0/24", "4")]);
    let p = n.pod();
    let ns = format!("/run/netns/{p}");
    let conf = n.conf("1.0.0");
    let full = |cmd: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", "bad".to_string()),
            ("CNI_NETNS", ns.clone()),
            ("CNI_IFNAME", "eth0".to_string()),
        ]
    };
    let call = |env: &[(&'static str, String)], stdin: &[u8]| {
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cni(&e, stdin)
    };
    let r = call(&full("ADD"), b"{not json");
    assert_eq!(r.err(), Some(6), "{r:?}");
    let r = call(&full("ADD"), br#"{"cniVersion":"2.0.0","name":"x"}"#);
    assert_eq!(r.err(), Some(1), "{r:?}");
    for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let env: Vec<_> = full("ADD")
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        let r = call(&env, conf.as_bytes());
        assert_eq!(r.err(), Some(4), "without {missing}: {r:?}");
    }
    let big = vec![b' '; (1 << 20) + 10];
    let r = call(&full("ADD"), &big);
    assert_eq!(r.err(), Some(7), "{r:?}");
    // A netns that does not exist.
    let mut env = full("ADD");
    env[2].1 = "/run/netns/does-not-exist".into();
    let r = call(&env, conf.as_bytes());
    assert_eq!(r.err(), Some(103), "{r:?}");
    // The interface name is already taken in the pod.
    ok(&[
        "ip", "-n", &p, "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]);
    let r = call(&full("ADD"), conf.as_bytes());
    assert_eq!(r.err(), Some(102), "{r:?}");
    assert!(
        n.coil_links().is_empty(),
        "nothing left: {:?}",
        n.coil_links()
    );
    // Every failure above left the address free: the pool's 16 addresses
    // in its first block are all still there for 16 pods.
    for i in 0..16 {
        let q = n.pod();
        let r = n.add(&q, &format!("fill{i}"));
        assert_eq!(r.code, 0, "{i}: {r:?}");
    }
    assert_eq!(n.table119().lines().count(), 1, "{}", n.table119());
    assert!(r.stderr.is_empty(), "plugin logs nothing: {r:?}");
    // coild not running: try again later.
    n.stop();
    let q = n.pod();
    let r = n.add(&q, "late");
    assert_eq!(r.err(), Some(11), "{r:?}");
    let v: Value = r.out;
    assert_eq!(v["cniVersion"], "1.0.0");
}

#[test]
fn etcd_store_leases_blocks_and_mirrors_addresses() {
    // etcd runs inside the node's netns (coild's loopback is the node's).
    let mut n = Node::new(
        StoreMode::Etcd {
            endpoint: String::new(),
            prefix: "/coil/".into(),
        },
        &[&[
            "pool",
            "create",
            "default",
            "10.89.0.0/24",
            "--block-size",
            "4",
        ]],
    );
    let p = n.pod();
    let r = n.add(&p, "etcd1");
    assert_eq!(r.code, 0, "{r:?}; log: {}", n.log());
    let ip = r.ip();
    let addr = ip.trim_end_matches("/32");
    // The lease is in etcd under this node's name.
    let o = n.coilctl(&["node", "blocks", &n.name, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{o:?}");
    // The address index catches up asynchronously.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let o = n.coilctl(&["address", "info", addr, "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if v["assignment"]["container_id"] == "etcd1" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "index never caught up: {o:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The node is alive.
    let o = n.coilctl(&["node", "list", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(
        v.as_array().is_some_and(|a| a
            .iter()
            .any(|x| x["node"] == n.name.as_str() && x["alive"] == true)),
        "{v}"
    );
    assert_eq!(n.del(&p, "etcd1").code, 0);
}

#[test]
fn unreachable_etcd_status_is_50_and_add_is_11() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut n = Node::new(
        StoreMode::Etcd {
            endpoint: format!("http://127.0.0.1:{port}"),
            prefix: "/coil/".into(),
        },
        &[],
    );
    let st = cni(&[("CNI_COMMAND", "STATUS")], n.conf("1.1.0").as_bytes());
    assert_eq!(st.err(), Some(50), "{st:?}");
    let p = n.pod();
    let r = n.add(&p, "noetcd");
    assert_eq!(r.err(), Some(11), "{r:?}");
    assert!(n.coil_links().is_empty());
}

#[test]
fn del_then_add_in_the_same_netns_and_batched_teardown() {
    let mut n = node(&[default_pool("10.94.0.0/28", "4")]);
    let p = n.pod();
    let a = n.add(&p, "first");
    assert_eq!(a.code, 0, "{a:?}");
    let first_ip = a.ip();
    // DEL answers at once; the veth is doomed (its pod end renamed out of
    // the way) and deleted later in a batch. A new ADD in the same netns
    // with the same ifname works right away ...
    assert_eq!(n.del(&p, "first").code, 0);
    let b = n.add(&p, "second");
    assert_eq!(b.code, 0, "{b:?}");
    // ... and never gets the address whose veth may still exist.
    assert_ne!(b.ip(), first_ip);
    let eth0 = ok(&["ip", "-n", &p, "-o", "-4", "addr", "show", "eth0"]);
    assert!(eth0.contains(&b.ip()), "{eth0}");
    // Once requests pause, the doomed veth is gone, pod end included.
    n.wait_for("the batched teardown", 10, |n| {
        n.coil_links().len() == 1 && n.stats()["attachments"] == 1
    });
    let links = ok(&["ip", "-n", &p, "-o", "link", "show"]);
    assert!(!links.contains("cdel"), "{links}");
    assert_eq!(n.call("CHECK", "1.0.0", &p, "second", "eth0", "").code, 0);
}
