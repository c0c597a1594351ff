//! coil-controller and coil-installer against a real etcd and a throwaway
//! netns.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coil::store::{AddressRecord, PoolSpec};
use coil_cli::controller::{pass, ControllerMetrics, PassState};
use coil_testkit as testkit;

const CONTROLLER: &str = env!("CARGO_BIN_EXE_coil-controller");
const INSTALLER: &str = env!("CARGO_BIN_EXE_coil-installer");
const HYPERCOIL: &str = env!("CARGO_BIN_EXE_hypercoil");

use common::{node_record as rec, shared_store as store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_replica_leads_and_leadership_moves() {
    let prefix = testkit::unique_prefix("leader");
    let (s, _) = store(&prefix).await;
    let a = s.campaign("replica-a", 5).await.expect("campaign");
    assert!(a.is_some(), "first replica leads");
    assert!(s
        .campaign("replica-b", 5)
        .await
        .expect("campaign")
        .is_none());
    assert_eq!(
        s.leader().await.expect("leader").as_deref(),
        Some("replica-a")
    );
    s.deregister_node(a.expect("lease"))
        .await
        .expect("step down");
    assert!(s
        .campaign("replica-b", 5)
        .await
        .expect("campaign")
        .is_some());
    assert_eq!(
        s.leader().await.expect("leader").as_deref(),
        Some("replica-b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_expiry_frees_nothing_only_removal_does() {
    let prefix = testkit::unique_prefix("janitor");
    let (s, _) = store(&prefix).await;
    s.create_pool(&PoolSpec {
        name: "default".into(),
        subnets: vec!["10.66.0.0/24".parse().expect("net")],
        block_size: 4,
        ipv6_block_size: None,
    })
    .await
    .expect("pool");
    s.register_node(&rec("alive"), 60).await.expect("register");
    s.register_node(&rec("dying"), 2).await.expect("register");
    let kept = s.acquire_block("default", "alive").await.expect("acquire");
    let d1 = s.acquire_block("default", "dying").await.expect("acquire");
    let ghost = s.acquire_block("default", "ghost").await.expect("acquire");
    // Garbage in the index: an entry whose node does not hold the block.
    let stray = AddressRecord {
        network: "k8s".into(),
        address: "10.66.0.250".parse().expect("ip"),
        pool: "default".into(),
        block: "10.66.0.240/28".parse().expect("net"),
        node: "nobody".into(),
        container_id: "x".into(),
        ifname: "eth0".into(),
        pod_namespace: String::new(),
        pod_name: String::new(),
    };
    s.put_address(&stray).await.expect("index");
    let lease = s
        .campaign("me", 30)
        .await
        .expect("campaign")
        .expect("leader");
    let m = ControllerMetrics::default();
    let mut since = PassState::default();
    let grace = Duration::from_millis(500);
    // "dying" stops heartbeating; passes go on far past the grace period.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        pass(&s, "me", &mut since, grace, None, &m)
            .await
            .expect("pass");
        let nodes = s.nodes().await.expect("nodes");
        let dying = nodes.iter().find(|n| n.node == "dying").expect("dying");
        if !dying.alive && dying.unreachable_since.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "dying never became unreachable");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    pass(&s, "me", &mut since, grace, None, &m)
        .await
        .expect("pass");
    // Liveness expiry is no proof of death: every block is still leased.
    let blocks = s.all_blocks().await.expect("blocks");
    assert_eq!(blocks.len(), 3, "a block was freed on liveness expiry");
    // The pool gauges the alert rules use: 16 blocks of 16 addresses, 3 leased.
    assert_eq!(
        *m.pools.lock().expect("pools"),
        vec![("default".to_string(), coil::store::Family::Ipv4, 16, 3)]
    );
    assert_eq!(
        m.blocks_released.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        m.nodes_unreachable
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let nodes = s.nodes().await.expect("nodes");
    let ghost_status = nodes.iter().find(|n| n.node == "ghost").expect("ghost");
    assert!(ghost_status.unreachable_since.is_some(), "{ghost_status:?}");
    assert!(
        s.address_info(stray.address)
            .await
            .expect("info")
            .record
            .is_none(),
        "index collected"
    );
    // An operator's removal is the proof: refused for a live node ...
    let e = s
        .remove_node("alive", "test", false, None)
        .await
        .expect_err("alive");
    assert!(
        matches!(e, coil::store::StoreError::NodeAlive { .. }),
        "{e}"
    );
    // ... one transaction fences the dead node and frees its blocks.
    let r = s
        .remove_node("ghost", "test", false, None)
        .await
        .expect("remove");
    assert_eq!(r.blocks, vec![ghost.block]);
    assert!(s.block(ghost.block).await.expect("block").1.is_none());
    assert!(s.removal("ghost").await.expect("fence").is_some());
    // A removed node leases nothing, not even its old block back.
    let e = s
        .acquire_block("default", "ghost")
        .await
        .expect_err("fenced");
    assert!(
        matches!(e, coil::store::StoreError::NodeRemoved { .. }),
        "{e}"
    );
    let e = s
        .acquire_specific("default", ghost.block, "ghost")
        .await
        .expect_err("fenced");
    assert!(
        matches!(e, coil::store::StoreError::NodeRemoved { .. }),
        "{e}"
    );
    // The controller neither removes it again nor notes it unreachable.
    pass(&s, "me", &mut since, grace, None, &m)
        .await
        .expect("pass");
    assert_eq!(
        m.nodes_unreachable
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Re-admitted, it may lease again.
    assert!(s.readmit_node("ghost").await.expect("readmit"));
    assert!(s.acquire_block("default", "ghost").await.is_ok());
    // The others are untouched.
    assert!(s.block(d1.block).await.expect("block").1.is_some());
    assert_eq!(
        s.block(kept.block)
            .await
            .expect("block")
            .1
            .map(|l| l.node)
            .as_deref(),
        Some("alive")
    );
    s.deregister_node(lease).await.expect("step down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_binary_keeps_an_unreachable_nodes_blocks_and_serves_metrics() {
    let prefix = testkit::unique_prefix("ctlbin");
    let (s, ep) = store(&prefix).await;
    s.create_pool(&PoolSpec {
        name: "default".into(),
        subnets: vec!["10.67.0.0/24".parse().expect("net")],
        block_size: 4,
        ipv6_block_size: None,
    })
    .await
    .expect("pool");
    s.acquire_block("default", "gone").await.expect("acquire");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut c = Command::new(CONTROLLER)
        .args([
            "--etcd-endpoints",
            &ep,
            "--etcd-prefix",
            &prefix,
            "--grace-period",
            "1s",
            "--interval",
            "200ms",
            "--identity",
            "test-controller",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("controller");
    let metrics = || {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).ok()?;
        Some(body)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = metrics().unwrap_or_default();
        if body.contains("coil_controller_nodes_unreachable 1") {
            break;
        }
        assert!(Instant::now() < deadline, "never reported: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Well past the grace period: the block is still reserved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.all_blocks().await.expect("blocks").len(), 1);
    let body = metrics().unwrap_or_default();
    assert!(body.contains("coil_controller_leader 1"), "{body}");
    assert!(
        body.contains("coil_controller_blocks_released_total 0"),
        "{body}"
    );
    assert!(
        body.contains("coil_controller_blocks_unreachable 1"),
        "{body}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let st = c.wait().expect("wait");
    assert!(st.success(), "{st}");
    assert!(
        s.leader().await.expect("leader").is_none(),
        "stepped down on SIGTERM"
    );
}

#[test]
fn installer_puts_plugin_and_conflist_in_place_and_enables_forwarding() {
    let d = tempfile::tempdir().expect("tempdir");
    let ns = format!("cinst{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "add", &ns]).status();
    let bin_dir = d.path().join("bin");
    let etc_dir = d.path().join("net.d");
    let conf = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"coil"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
    let run = |conf: &str| {
        Command::new("ip")
            .args(["netns", "exec", &ns, INSTALLER])
            .env("CNI_BIN_DIR", &bin_dir)
            .env("CNI_ETC_DIR", &etc_dir)
            .env("CNI_NETCONF", conf)
            .env(
                "COIL_PATH",
                std::path::Path::new(HYPERCOIL).parent().expect("dir"),
            )
            .output()
            .expect("installer")
    };
    let o = run(conf);
    assert!(o.status.success(), "{o:?}");
    let installed = std::fs::read_to_string(etc_dir.join("10-coil.conflist")).expect("conflist");
    assert_eq!(installed, conf);
    let meta = std::fs::metadata(bin_dir.join("coil")).expect("plugin");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    let fwd = Command::new("ip")
        .args(["netns", "exec", &ns, "cat", "/proc/sys/net/ipv4/ip_forward"])
        .output()
        .expect("cat");
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
    // A conflist without coil is refused and nothing is replaced.
    let o = run(r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"ptp"}]}"#);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(etc_dir.join("10-coil.conflist")).expect("conflist"),
        conf
    );
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
}

#[test]
fn installer_refuses_a_conf_name_that_is_not_a_file_name() {
    let d = tempfile::tempdir().expect("tempdir");
    let ns = format!("cname{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "add", &ns]).status();
    let etc_dir = d.path().join("etc").join("net.d");
    let bin_dir = d.path().join("bin");
    for bad in [
        "",
        ".",
        "..",
        "../escape.conflist",
        "sub/x.conflist",
        "/tmp/x.conflist",
    ] {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns, INSTALLER])
            .env("CNI_BIN_DIR", &bin_dir)
            .env("CNI_ETC_DIR", &etc_dir)
            .env("CNI_CONF_NAME", bad)
            .env(
                "CNI_NETCONF",
                r#"{"cniVersion":"1.0.0","name":"k","plugins":[{"type":"coil"}]}"#,
            )
            .env(
                "COIL_PATH",
                std::path::Path::new(HYPERCOIL).parent().expect("dir"),
            )
            .output()
            .expect("installer");
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("CNI_CONF_NAME") && err.contains("not a file name"),
            "{bad:?}: {err}"
        );
        // Nothing written anywhere: not the plugin, not the conflist.
        let left: Vec<_> = std::fs::read_dir(d.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{bad:?} left {left:?}");
    }
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
}
