// The cases of driver.rs and engine.rs, included by both (see there).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coil::cni::{parse_request, Response};
use coil::kernel::KernelOps;
use coil::kernel_mem::MemKernel;
use coil::store::{PoolSpec, Store};
use serde_json::Value;

use simkit::D;

/// One run of coild: its runtime and the daemon.
struct Run {
    rt: Option<tokio::runtime::Runtime>,
    d: Option<Arc<D>>,
    journal: Option<Arc<coil::journal::Journal>>,
}

impl Run {
    /// kill -9, as far as a process can do it to itself: every task is
    /// dropped at its next await.
    fn kill(&mut self) {
        self.d = None;
        self.journal = None;
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }

    fn d(&self) -> &Arc<D> {
        self.d.as_ref().expect("running")
    }

    fn call(&self, cmd: &str, cid: &str, netns: Option<&str>, extra: &str) -> Response {
        let mut env: Vec<(String, String)> = vec![
            ("CNI_COMMAND".into(), cmd.into()),
            ("CNI_CONTAINERID".into(), cid.into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), "/opt/cni/bin".into()),
            (
                "CNI_ARGS".into(),
                format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}"),
            ),
        ];
        if let Some(n) = netns {
            env.push(("CNI_NETNS".into(), n.into()));
        }
        let conf = format!(r#"{{"cniVersion":"1.1.0","name":"k8s","type":"coil"{extra}}}"#);
        let req = parse_request(
            |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            conf.as_bytes(),
        )
        .expect("request");
        let d = self.d().clone();
        self.rt
            .as_ref()
            .expect("running")
            .block_on(async move { d.handle(req).await })
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Node {
    dir: tempfile::TempDir,
    kernel: MemKernel,
}

impl Node {
    fn new() -> Node {
        let n = Node {
            dir: tempfile::tempdir().expect("tempdir"),
            kernel: MemKernel::default(),
        };
        n.set_boot("boot-1");
        n
    }

    fn set_boot(&self, id: &str) {
        std::fs::write(self.dir.path().join("boot_id"), format!("{id}\n")).expect("boot id");
    }

    /// Starts coild; the first start creates the pool `default` first.
    fn start(&self, pool: &[&str]) -> Run {
        let pool: Vec<IpAddrNet> = pool.iter().map(|s| s.parse().expect("subnet")).collect();
        let spec = (!pool.is_empty()).then(|| PoolSpec::new("default", pool, 2));
        let mut cfg = simkit::inproc_config(self.dir.path(), "driver-node");
        cfg.engine = ENGINE;
        let (rt, d, journal) = simkit::start_inproc(
            cfg,
            self.kernel.clone(),
            spec,
        )
        .expect("coild starts");
        Run {
            rt: Some(rt),
            d: Some(d),
            journal: Some(journal),
        }
    }

    fn pod(&self, name: &str) -> String {
        let p = format!("/run/netns/{name}");
        self.kernel.add_netns(&p);
        p
    }
}

type IpAddrNet = ipnet::IpNet;

fn ok(r: &Response) -> &Value {
    assert!(r.ok, "{}", r.stdout);
    &r.stdout
}

fn ips(r: &Response) -> Vec<IpAddr> {
    ok(r);
    simkit::answer_ips(r)
}

fn code(r: &Response) -> u64 {
    assert!(!r.ok, "expected an error: {}", r.stdout);
    r.stdout["code"].as_u64().unwrap_or(0)
}

/// Waits (bounded) until DEL's background teardown has removed the links.
fn wait_links(k: &MemKernel, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while k.link_names().len() != want {
        assert!(
            Instant::now() < deadline,
            "links: {:?}, want {want}",
            k.link_names()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until `ok` holds.
fn wait_for(ok: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn block_on<F: std::future::Future>(run: &Run, f: F) -> F::Output {
    run.rt.as_ref().expect("running").block_on(f)
}

/// The links a fresh ADD of pod `cid` makes while its reservation syncs
/// (veth and routes, no address), made here with no journal record: what
/// a kill between the two leaves. Returns their spec.
fn unrecorded_links(n: &Node, run: &Run, cid: &str, netns: &str, addr: &str) -> coil::kernel::WireSpec {
    let key = coil::journal::AttachmentKey::new("k8s", cid, "eth0");
    let spec = coil::kernel::WireSpec {
        netns: netns.to_string(),
        ifname: "eth0".into(),
        host_veth: coil::node::host_veth_name(&key),
        alias: coil::node::veth_alias(&key),
        addresses: vec![addr.parse().expect("ip")],
        mtu: 1500,
    };
    block_on(run, n.kernel.prepare_in(&spec, None)).expect("links");
    spec
}

#[test]
fn add_check_del_gc_run_without_root() {
    let n = Node::new();
    let run = n.start(&["10.40.0.0/28", "fd00:40::/124"]);
    let pa = n.pod("pa");
    let a = run.call("ADD", "pa", Some(&pa), "");
    let got = ips(&a);
    assert_eq!(got.len(), 2, "dual-stack: {}", a.stdout);
    // The kernel holds what the answer says.
    let mut on_pod = n.kernel.pod_addresses(&pa, "eth0").expect("eth0");
    on_pod.sort();
    let mut want = got.clone();
    want.sort();
    assert_eq!(on_pod, want);
    assert!(run.call("CHECK", "pa", Some(&pa), "").ok);
    // Drift is reported by CHECK (107 lists it).
    let host6: IpAddrNet = format!("{}/128", got[1]).parse().expect("net");
    n.kernel.drop_host_route(host6);
    let c = run.call("CHECK", "pa", Some(&pa), "");
    assert_eq!(code(&c), 107, "{}", c.stdout);
    // A repeated ADD answers the same addresses.
    assert_eq!(ips(&run.call("ADD", "pa", Some(&pa), "")), got);
    // A missing netns is 103 and takes nothing.
    let r = run.call("ADD", "ghost", Some("/run/netns/ghost"), "");
    assert_eq!(code(&r), 103, "{}", r.stdout);
    // GC keeps what is listed and releases the rest of its network.
    let pb = n.pod("pb");
    ips(&run.call("ADD", "pb", Some(&pb), ""));
    let keep = r#","cni.dev/valid-attachments":[{"containerID":"pb","ifname":"eth0"}]"#.to_string();
    let g = run.call("GC", "", None, &keep);
    ok(&g);
    wait_links(&n.kernel, 1);
    assert_eq!(n.kernel.link_names().len(), 1);
    assert!(n.kernel.pod_addresses(&pb, "eth0").is_some());
    // DEL, twice, and DEL without a netns.
    assert!(run.call("DEL", "pb", Some(&pb), "").ok);
    assert!(run.call("DEL", "pb", Some(&pb), "").ok);
    assert!(run.call("DEL", "never", None, "").ok);
    wait_links(&n.kernel, 0);
    let routes = block_on(&run, n.kernel.host_routes()).expect("routes");
    assert!(
        routes.iter().all(|(d, _)| !got.contains(&d.addr())),
        "{routes:?}"
    );
}

#[test]
fn a_failed_wire_takes_nothing_and_a_killed_coild_recovers() {
    let n = Node::new();
    let mut run = n.start(&["10.41.0.0/28"]);
    let p0 = n.pod("p0");
    n.kernel.fail_next_wires(1);
    let r = run.call("ADD", "p0", Some(&p0), "");
    assert_eq!(code(&r), 104, "{}", r.stdout);
    assert!(n.kernel.link_names().is_empty());
    // The machine frees the reservation once the unwire after the failed
    // wire is done, which may come just after the answer.
    wait_for(|| run.d().stats()["attachments"] == 0, "the reservation freed");
    // Five pods, then kill coild.
    let mut held = Vec::new();
    for i in 0..5 {
        let p = n.pod(&format!("k{i}"));
        held.push((
            format!("k{i}"),
            p.clone(),
            ips(&run.call("ADD", &format!("k{i}"), Some(&p), "")),
        ));
    }
    run.kill();
    // While it is down: one pod's veth is deleted by hand, another pod's
    // netns is deleted (its veth goes with it).
    assert!(n.kernel.drop_link(&n.kernel.link_names()[0]));
    n.kernel.remove_netns(&held[4].1);
    let run = n.start(&[]);
    // Four pods are wired again with the addresses they had; the fifth is
    // released.
    assert_eq!(run.d().stats()["attachments"], 4, "{}", run.d().stats());
    let wired: BTreeSet<IpAddr> = n
        .kernel
        .wired_addresses()
        .into_iter()
        .map(|x| x.0)
        .collect();
    for (cid, p, a) in &held[..4] {
        assert!(wired.contains(&a[0]), "{cid} lost {a:?}: {wired:?}");
        assert!(run.call("CHECK", cid, Some(p), "").ok, "{cid}");
    }
    // The released address is free again, and nothing is handed out twice.
    let mut seen: BTreeSet<IpAddr> = held[..4].iter().map(|h| h.2[0]).collect();
    for i in 0..8 {
        let p = n.pod(&format!("m{i}"));
        let a = ips(&run.call("ADD", &format!("m{i}"), Some(&p), ""));
        assert!(seen.insert(a[0]), "{} handed out twice", a[0]);
    }
    let exported = block_on(&run, n.kernel.exported_blocks()).expect("exported");
    assert!(!exported.is_empty());
}

#[test]
fn a_retried_add_adopts_a_wire_that_finished_after_its_deadline() {
    let n = Node::new();
    let run = n.start(&["10.41.0.0/28"]);
    let pa = n.pod("pa");
    // The wire completes but reports its deadline passed: the ADD fails
    // with 11 and keeps the reservation.
    n.kernel.time_out_next_wires(1);
    let r = run.call("ADD", "pa", Some(&pa), "");
    assert_eq!(code(&r), 11, "{}", r.stdout);
    let held = n
        .kernel
        .pod_addresses(&pa, "eth0")
        .expect("wired after all");
    let veth = n.kernel.link_names().pop().expect("host veth");
    let index = n.kernel.link_index(&veth);
    // The runtime retries: the complete wiring is adopted as it is (same
    // interface, same address), not torn down and not given up.
    let again = run.call("ADD", "pa", Some(&pa), "");
    assert_eq!(ips(&again), held);
    assert_eq!(
        n.kernel.link_index(&veth),
        index,
        "the pod's veth was replaced"
    );
    // Its address stays taken: the next pod gets another one.
    let pb = n.pod("pb");
    let b = ips(&run.call("ADD", "pb", Some(&pb), ""));
    assert!(b.iter().all(|x| !held.contains(x)), "{b:?} reuses {held:?}");
    let all: Vec<IpAddr> = n
        .kernel
        .wired_addresses()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    let unique: std::collections::BTreeSet<&IpAddr> = all.iter().collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "an address is on two veths: {all:?}"
    );
}

/// The links an ADD makes while its reservation syncs are removed when
/// the journal refuses the reservation: nothing is left of the pod.
#[test]
fn links_made_while_the_reservation_syncs_go_when_the_journal_refuses_it() {
    let n = Node::new();
    let run = n.start(&["10.45.0.0/28"]);
    // A first pod leases the block, so the next ADD needs no store call.
    let pa = n.pod("pa");
    ips(&run.call("ADD", "pa", Some(&pa), ""));
    run.journal.as_ref().expect("journal").inject_sync_failure();
    let pb = n.pod("pb");
    let r = run.call("ADD", "pb", Some(&pb), "");
    assert!(!r.ok, "{}", r.stdout);
    assert_eq!(
        n.kernel.link_names().len(),
        1,
        "{:?}",
        n.kernel.link_names()
    );
    assert!(n.kernel.pod_addresses(&pb, "eth0").is_none());
    assert!(n.kernel.pod_addresses(&pa, "eth0").is_some());
}

/// A kill while an ADD's reservation is being synced can leave the links
/// made meanwhile (an addressless veth) with no journal record at all:
/// recovery's full scan removes it, and the pod's retried ADD wires anew.
#[test]
fn an_addressless_veth_left_by_a_kill_before_the_commit_is_removed() {
    let n = Node::new();
    let run = n.start(&["10.46.0.0/28"]);
    let pa = n.pod("pa");
    let spec = unrecorded_links(&n, &run, "pa", &pa, "10.46.0.1");
    assert_eq!(n.kernel.link_names(), vec![spec.host_veth.clone()]);
    assert!(n
        .kernel
        .pod_addresses(&pa, "eth0")
        .is_some_and(|a| a.is_empty()));
    block_on(&run, run.d().recover(false, true, false)).expect("recover");
    assert!(
        n.kernel.link_names().is_empty(),
        "{:?}",
        n.kernel.link_names()
    );
    // The runtime's retried ADD wires the pod from scratch.
    let got = ips(&run.call("ADD", "pa", Some(&pa), ""));
    assert_eq!(n.kernel.pod_addresses(&pa, "eth0"), Some(got));
}

#[test]
fn a_reboot_releases_every_pod_of_the_old_boot() {
    let n = Node::new();
    let mut run = n.start(&["10.42.0.0/28"]);
    for i in 0..3 {
        let p = n.pod(&format!("r{i}"));
        ips(&run.call("ADD", &format!("r{i}"), Some(&p), ""));
    }
    run.kill();
    n.kernel.reboot();
    n.set_boot("boot-2");
    let run = n.start(&[]);
    assert_eq!(run.d().stats()["attachments"], 0, "{}", run.d().stats());
    assert!(n.kernel.link_names().is_empty());
    // The embedded store confirms the leases at once: the node serves and
    // republishes its block.
    let p = n.pod("after");
    assert_eq!(ips(&run.call("ADD", "after", Some(&p), "")).len(), 1);
    let exported = block_on(&run, n.kernel.exported_blocks()).expect("exported");
    assert_eq!(exported.len(), 1, "{exported:?}");
}

#[test]
fn a_pool_made_dual_stack_serves_new_pods_both_families() {
    let n = Node::new();
    let mut cfg = simkit::inproc_config(n.dir.path(), "driver-node");
    cfg.pool_cache_ttl = Duration::from_millis(100);
    let (rt, d, _journal) = simkit::start_inproc(
        cfg,
        n.kernel.clone(),
        Some(PoolSpec::new(
            "default",
            vec!["10.43.0.0/28".parse().expect("net")],
            2,
        )),
    )
    .expect("coild starts");
    let run = Run {
        rt: Some(rt),
        d: Some(d),
        journal: None,
    };
    let p0 = n.pod("before");
    assert_eq!(ips(&run.call("ADD", "before", Some(&p0), "")).len(), 1);
    // The operator adds an IPv6 half to the running pool.
    let backend = run.d().store_backend().clone();
    block_on(&run, async move {
        Store::open_lazy(backend, "/coil/")
            .expect("store")
            .add_subnet_with("default", "fd00:43::/124".parse().expect("net"), Some(2))
            .await
            .expect("add the IPv6 half")
    });
    // Once the cached answer is stale, the next ADD still answers at once
    // from it and refreshes it in the background; within a bounded time
    // new pods get both families. The pod wired before keeps its one.
    std::thread::sleep(Duration::from_millis(150));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    let got = loop {
        i += 1;
        let cid = format!("after{i}");
        let p = n.pod(&cid);
        let a = ips(&run.call("ADD", &cid, Some(&p), ""));
        if a.len() == 2 || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[1].is_ipv6(), "{got:?}");
    assert_eq!(
        n.kernel.pod_addresses(&p0, "eth0").map(|a| a.len()),
        Some(1)
    );
    assert!(run.call("CHECK", "before", Some(&p0), "").ok);
}

#[test]
fn kubernetes_events_tell_of_exhaustion_quarantine_readmission_and_lease_loss() {
    let fake = fakekube::FakeKube::start(None);
    fake.with(|st| st.add_node("driver-node", serde_json::json!([])));
    // The sink's task runs on a runtime of the test's: it outlives a
    // coild that is started and stopped.
    let ert = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let kc = fake.kubeconfig();
    let sink = ert.block_on(async move {
        let cfg = coil_cli::kube::config(Some(&kc)).await.expect("kubeconfig");
        let client = coil_cli::kube::client_from(cfg, coil_cli::kube::MAX_ANSWER).expect("client");
        coil_cli::kube::EventSink::start(client, "driver-node")
    });
    let n = Node::new();
    let mut cfg = simkit::inproc_config(n.dir.path(), "driver-node");
    cfg.engine = ENGINE;
    cfg.events = sink.clone();
    // One block of four addresses in all.
    let (rt, d, _journal) = simkit::start_inproc(
        cfg,
        n.kernel.clone(),
        Some(PoolSpec::new(
            "default",
            vec!["10.44.0.0/30".parse().expect("net")],
            2,
        )),
    )
    .expect("coild starts");
    let run = Run {
        rt: Some(rt),
        d: Some(d),
        journal: None,
    };
    for i in 0..4 {
        let cid = format!("p{i}");
        let p = n.pod(&cid);
        assert_eq!(ips(&run.call("ADD", &cid, Some(&p), "")).len(), 1);
    }
    for cid in ["full1", "full2"] {
        let p = n.pod(cid);
        let r = run.call("ADD", cid, Some(&p), "");
        assert!(!r.ok, "{}", r.stdout);
    }
    let reasons = |fake: &fakekube::FakeKube| -> Vec<String> {
        fake.with(|st| {
            st.posted_events
                .iter()
                .filter_map(|e| e["reason"].as_str().map(String::from))
                .collect()
        })
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "no {what}: {:?}", reasons(&fake));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("exhaustion Event", &|| {
        reasons(&fake).contains(&"CoilPoolExhausted".to_string())
    });
    wait("suppressed repeat", &|| {
        sink.stats
            .suppressed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    });
    // The operator removes the node: the next recovery quarantines it.
    let backend = run.d().store_backend().clone();
    let store = Arc::new(Store::open_lazy(backend, "/coil/").expect("store"));
    let s2 = store.clone();
    block_on(&run, async move {
        s2.remove_node("driver-node", "test", true, None)
            .await
            .expect("remove")
    });
    let d = run.d().clone();
    block_on(&run, async move { d.recover(false, false, true).await }).expect("recover");
    wait("quarantine and lease-loss Events", &|| {
        let r = reasons(&fake);
        r.contains(&"CoilNodeQuarantined".to_string()) && r.contains(&"CoilLeaseLost".to_string())
    });
    // Its block goes to another node; the node is re-admitted.
    let s2 = store.clone();
    block_on(&run, async move {
        s2.acquire_block("default", "other").await.expect("acquire");
        assert!(s2.readmit_node("driver-node").await.expect("readmit"));
    });
    let d = run.d().clone();
    block_on(&run, async move { d.recover(false, false, true).await }).expect("recover");
    wait("re-admission Event", &|| {
        reasons(&fake).contains(&"CoilNodeReadmitted".to_string())
    });
    let posted = fake.with(|st| st.posted_events.clone());
    let exhausted: Vec<_> = posted
        .iter()
        .filter(|e| e["reason"] == "CoilPoolExhausted")
        .collect();
    assert_eq!(exhausted.len(), 1, "a repeat within 5 min is not sent");
    for e in &posted {
        assert_eq!(e["regarding"]["kind"], "Node", "{e}");
        assert_eq!(e["regarding"]["name"], "driver-node", "{e}");
        assert_eq!(e["reportingController"], "coil.cybozu.com/coild", "{e}");
        assert_eq!(e["reportingInstance"], "driver-node", "{e}");
        let want = if e["reason"] == "CoilNodeReadmitted" {
            "Normal"
        } else {
            "Warning"
        };
        assert_eq!(e["type"], want, "{e}");
    }
    let q = posted
        .iter()
        .find(|e| e["reason"] == "CoilNodeQuarantined")
        .expect("quarantine");
    assert!(
        q["note"]
            .as_str()
            .unwrap_or("")
            .contains("coilctl node readmit driver-node"),
        "{q}"
    );
    // The removal took the block's lease away with four pods in it.
    let lost = posted
        .iter()
        .find(|e| e["reason"] == "CoilLeaseLost")
        .expect("lease lost");
    assert!(
        lost["note"].as_str().unwrap_or("").contains("4 pod(s)"),
        "{lost}"
    );
    let m = run.d().metrics_text();
    let sent = format!(
        r#"coil_kube_events_total{{node="driver-node",result="sent"}} {}"#,
        posted.len()
    );
    assert!(m.contains(&sent), "{sent} in {m}");
    assert!(fake.seen().iter().all(|r| r.authorized));
}
