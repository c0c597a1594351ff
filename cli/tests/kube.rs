//! coil's Kubernetes side against an HTTPS fake API server (there is no
//! kube-apiserver here): the controller's watched Node set, what it does
//! with a deletion, what it refuses to trust, the installer's taint
//! removal, all over TLS with a bearer token, and a real etcd.

mod fakekube;

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coil::store::{PoolSpec, Store};
use coil_adapters::etcd::EtcdBackend;
use coil_cli::controller::{pass, ControllerMetrics, KubeNodes, PassState};
use coil_cli::kube::NodeWatch;
use coil_testkit as testkit;
use fakekube::FakeKube;
use serde_json::json;

const CONTROLLER: &str = env!("CARGO_BIN_EXE_coil-controller");
const INSTALLER: &str = env!("CARGO_BIN_EXE_coil-installer");
const HYPERCOIL: &str = env!("CARGO_BIN_EXE_hypercoil");

use common::{node_record as rec, shared_store as store};

async fn pool(s: &Store<EtcdBackend>, subnet: &str) {
    s.create_pool(&PoolSpec {
        name: "default".into(),
        subnets: vec![subnet.parse().expect("net")],
        block_size: 4,
        ipv6_block_size: None,
    })
    .await
    .expect("pool");
}

/// A watch on `fake` through a client whose answers are capped at
/// `cap` bytes, using the kubeconfig at `kubeconfig`.
async fn watch_with(kubeconfig: &std::path::Path, cap: usize) -> NodeWatch {
    let cfg = coil_cli::kube::config(Some(kubeconfig))
        .await
        .expect("kubeconfig");
    NodeWatch::start(coil_cli::kube::client_from(cfg, cap).expect("client"))
}

/// Polls `f` every 50 ms for at most `secs` seconds.
async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn owners(s: &Store<EtcdBackend>) -> Vec<String> {
    let mut o: Vec<String> = s
        .all_blocks()
        .await
        .expect("blocks")
        .into_iter()
        .map(|l| l.node)
        .collect();
    o.sort();
    o
}

async fn one_pass(s: &Store<EtcdBackend>, kube: &KubeNodes, m: &ControllerMetrics) {
    let mut since = PassState::default();
    // A grace of an hour: only the API's word can make a node due now.
    pass(
        s,
        "me",
        &mut since,
        Duration::from_secs(3600),
        Some(kube),
        m,
    )
    .await
    .expect("pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_node_deletion_skips_the_grace_but_never_frees_a_live_node() {
    let prefix = testkit::unique_prefix("kubewatch");
    let (s, _) = store(&prefix).await;
    pool(&s, "10.68.0.0/24").await;
    s.register_node(&rec("live-but-deleted"), 60)
        .await
        .expect("register");
    for n in ["live-but-deleted", "deleted", "present"] {
        s.acquire_block("default", n).await.expect("acquire");
    }
    let fake = FakeKube::start(None);
    fake.with(|st| {
        for n in ["live-but-deleted", "deleted", "present", "bystander"] {
            st.add_node(n, json!([]));
        }
    });
    let w = watch_with(&fake.kubeconfig(), coil_cli::kube::MAX_ANSWER).await;
    wait_for("the first list", 10, || w.snapshot().is_ok()).await;
    let kube = KubeNodes {
        nodes: w.clone(),
        max_deleted_fraction: 0.5,
    };
    let lease = s
        .campaign("me", 30)
        .await
        .expect("campaign")
        .expect("leader");
    let m = ControllerMetrics::default();
    one_pass(&s, &kube, &m).await;
    assert_eq!(
        owners(&s).await,
        vec!["deleted", "live-but-deleted", "present"],
        "every Node exists: nothing is freed"
    );
    // Deletions arrive as watch events, not as a new list.
    fake.with(|st| {
        st.delete_node("deleted");
        st.delete_node("live-but-deleted");
    });
    wait_for("the deletions", 10, || {
        w.snapshot()
            .is_ok_and(|n| !n.contains("deleted") && !n.contains("live-but-deleted"))
    })
    .await;
    one_pass(&s, &kube, &m).await;
    assert_eq!(
        owners(&s).await,
        vec!["live-but-deleted", "present"],
        "dead and deleted: freed at once; alive: never; dead but present: kept"
    );
    assert!(
        s.removal("deleted").await.expect("fence").is_some(),
        "a node removed for its deleted Node carries the fence"
    );
    assert_eq!(w.lists(), 1, "the deletions came by the watch");
    let seen = fake.seen();
    assert!(seen.iter().all(|r| r.authorized), "{seen:?}");
    assert!(
        seen.iter()
            .any(|r| r.uri.starts_with("/api/v1/nodes?") && r.uri.contains("limit=500")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|r| r.uri.contains("watch=true")),
        "{seen:?}"
    );
    s.deregister_node(lease).await.expect("step down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refused_or_suspect_node_set_frees_nothing() {
    let prefix = testkit::unique_prefix("kubebad");
    let (s, _) = store(&prefix).await;
    pool(&s, "10.69.0.0/24").await;
    s.register_node(&rec("alive"), 60).await.expect("register");
    for n in ["alive", "dead1", "dead2"] {
        s.acquire_block("default", n).await.expect("acquire");
    }
    let lease = s
        .campaign("me", 30)
        .await
        .expect("campaign")
        .expect("leader");
    let m = ControllerMetrics::default();
    let everyone = vec!["alive", "dead1", "dead2"];
    let cap = 64 << 10;
    // (case, what the fake holds and does, which token)
    type Setup = fn(&mut fakekube::State);
    let cases: Vec<(&str, Setup, bool)> = vec![
        (
            "HTTP 500",
            |st| st.list_failure = Some((500, "{}".into())),
            true,
        ),
        (
            "not a list",
            |st| st.list_failure = Some((200, r#"{"kind":"#.into())),
            true,
        ),
        (
            "an answer over the size cap",
            |st| st.list_oversize = Some(100 << 10),
            true,
        ),
        (
            "a wrong bearer token",
            |st| st.add_node("alive", json!([])),
            false,
        ),
        ("empty while nodes are alive", |_| {}, true),
        (
            "two of three holders gone",
            |st| st.add_node("alive", json!([])),
            true,
        ),
    ];
    let ncases = cases.len() as u64;
    for (what, setup, right_token) in cases {
        let fake = FakeKube::start(None);
        fake.with(setup);
        let kc = if right_token {
            fake.kubeconfig()
        } else {
            fake.write_kubeconfig("wrong", "not-the-token")
        };
        let w = watch_with(&kc, cap).await;
        // Give the watch time to list (or fail to) at least twice.
        wait_for(&format!("{what}: two list attempts"), 10, || {
            fake.seen()
                .iter()
                .filter(|r| r.uri.starts_with("/api/v1/nodes?") && !r.uri.contains("watch"))
                .count()
                >= 2
                || w.snapshot().is_ok()
        })
        .await;
        let kube = KubeNodes {
            nodes: w,
            max_deleted_fraction: 0.5,
        };
        one_pass(&s, &kube, &m).await;
        assert_eq!(owners(&s).await, everyone, "{what}: nothing may be freed");
        if what == "an answer over the size cap" {
            let why = kube.nodes.snapshot().expect_err("refused, not a set");
            assert!(why.contains("more than"), "{what}: {why}");
        }
    }
    assert_eq!(
        m.kube_lists_ignored
            .load(std::sync::atomic::Ordering::Relaxed),
        ncases
    );

    // A list that fails, then comes back whole over three pages: only
    // then is the one node on no page (dead2) freed.
    let fake = FakeKube::start(None);
    fake.with(|st| {
        st.list_failure = Some((503, "{}".into()));
        st.add_node("alive", json!([]));
        st.add_node("dead1", json!([]));
        for i in 0..1100 {
            st.add_node(&format!("other-{i:04}"), json!([]));
        }
    });
    let w = watch_with(&fake.kubeconfig(), coil_cli::kube::MAX_ANSWER).await;
    let kube = KubeNodes {
        nodes: w.clone(),
        max_deleted_fraction: 0.5,
    };
    wait_for("a failed list", 10, || !fake.seen().is_empty()).await;
    one_pass(&s, &kube, &m).await;
    assert_eq!(owners(&s).await, everyone, "the list failed: nothing freed");
    fake.with(|st| st.list_failure = None);
    wait_for("a whole list after the failure", 15, || {
        w.snapshot().is_ok()
    })
    .await;
    assert_eq!(w.snapshot().expect("set").len(), 1102);
    let pages = fake
        .seen()
        .iter()
        .filter(|r| r.uri.contains("continue=at"))
        .count();
    assert!(pages >= 2, "three pages of 500: {pages} continuations");
    one_pass(&s, &kube, &m).await;
    assert_eq!(owners(&s).await, vec!["alive", "dead1"]);

    // The server ends the watch: it is resumed from the last version, and
    // a deletion made in between is still seen, without a new list.
    let lists = w.lists();
    fake.with(|st| {
        st.drop_watches();
        st.delete_node("dead1");
    });
    wait_for("the deletion across a dropped watch", 15, || {
        w.snapshot().is_ok_and(|n| !n.contains("dead1"))
    })
    .await;
    assert_eq!(w.lists(), lists, "a resumed watch needs no new list");
    one_pass(&s, &kube, &m).await;
    assert_eq!(owners(&s).await, vec!["alive"]);

    // The watch ends, a Node is added, and the history is compacted: the
    // resumed watch gets 410 Gone, and the set is trusted again only once
    // a fresh list is whole.
    fake.with(|st| {
        st.list_failure = Some((503, "{}".into()));
        st.drop_watches();
        st.add_node("late", json!([]));
        st.compact();
    });
    // While no fresh list completes, the set is not trusted.
    wait_for("the set to be distrusted after 410 Gone", 15, || {
        w.snapshot().is_err()
    })
    .await;
    one_pass(&s, &kube, &m).await;
    assert_eq!(owners(&s).await, vec!["alive"]);
    fake.with(|st| st.list_failure = None);
    wait_for("a fresh list after 410 Gone", 15, || w.lists() > lists).await;
    wait_for("the new node", 15, || {
        w.snapshot().is_ok_and(|n| n.contains("late"))
    })
    .await;
    s.deregister_node(lease).await.expect("step down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_binary_watches_nodes_through_a_kubeconfig() {
    let prefix = testkit::unique_prefix("kubebin");
    let (s, ep) = store(&prefix).await;
    pool(&s, "10.70.0.0/24").await;
    s.acquire_block("default", "gone").await.expect("acquire");
    s.acquire_block("default", "stays").await.expect("acquire");
    let fake = FakeKube::start(None);
    fake.with(|st| {
        for n in ["gone", "stays", "a", "b"] {
            st.add_node(n, json!([]));
        }
    });
    let mut c = Command::new(CONTROLLER)
        .args([
            "--etcd-endpoints",
            &ep,
            "--etcd-prefix",
            &prefix,
            "--grace-period",
            "60m",
            "--interval",
            "200ms",
            "--identity",
            "kube-controller",
        ])
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("controller");
    wait_for("a watch", 20, || {
        fake.seen().iter().any(|r| r.uri.contains("watch=true"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(owners(&s).await, vec!["gone", "stays"]);
    fake.with(|st| st.delete_node("gone"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while owners(&s).await != vec!["stays"] {
        assert!(Instant::now() < deadline, "{:?}", owners(&s).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let st = c.wait().expect("wait");
    assert!(st.success(), "{st}");
}

#[test]
fn the_controller_refuses_an_unreadable_kubeconfig() {
    let o = Command::new(CONTROLLER)
        .args([
            "--etcd-endpoints",
            "http://127.0.0.1:1",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ])
        .output()
        .expect("controller");
    assert_eq!(o.status.code(), Some(coil::exit::USAGE), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
}

/// A fresh netns `<tag><pid>` with its loopback up (root only: without
/// it, the fake's bind inside it fails loudly).
fn test_netns(tag: &str) -> String {
    let ns = format!("{tag}{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "add", &ns]).status();
    let _ = Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "up"])
        .status();
    ns
}

/// The installer inside `ns` (run through `wrapper` when given), installing
/// into `dir` and asked to remove node n1's boot taint; no kubeconfig is
/// inherited from the caller's environment.
fn installer_command(ns: &str, dir: &std::path::Path, wrapper: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]);
    if wrapper.is_empty() {
        c.arg(INSTALLER);
    } else {
        c.args(wrapper);
    }
    c.env("CNI_BIN_DIR", dir.join("bin"))
        .env("CNI_ETC_DIR", dir.join("net.d"))
        .env(
            "CNI_NETCONF",
            r#"{"cniVersion":"1.0.0","name":"k","plugins":[{"type":"coil"}]}"#,
        )
        .env(
            "COIL_PATH",
            std::path::Path::new(HYPERCOIL).parent().expect("dir"),
        )
        .env("COIL_NODE_NAME", "n1")
        .env("COIL_BOOT_TAINT", "coil.cybozu.com/bootstrap")
        .env_remove("KUBECONFIG")
        .env_remove("COIL_KUBECONFIG");
    c
}

/// Runs the installer inside `ns` against the fake, with `kubeconfig`.
fn run_installer(
    ns: &str,
    dir: &std::path::Path,
    kubeconfig: &std::path::Path,
) -> std::process::Output {
    installer_command(ns, dir, &[])
        .env("COIL_KUBECONFIG", kubeconfig)
        .output()
        .expect("installer")
}

#[test]
fn installer_removes_the_boot_taint_and_keeps_a_taint_added_meanwhile() {
    let d = tempfile::tempdir().expect("tempdir");
    let ns = test_netns("ctaint");
    let fake = FakeKube::start(Some(&ns));
    fake.with(|st| {
        st.add_node(
            "n1",
            json!([
                {"key": "coil.cybozu.com/bootstrap", "effect": "NoSchedule"},
                {"key": "other", "effect": "NoSchedule"}
            ]),
        );
        // Someone taints the Node between the installer's GET and PATCH.
        st.taint_before_patch = Some(json!({"key": "late", "effect": "NoExecute"}));
    });
    // A wrong token: a clear failure, the Node untouched.
    let bad = run_installer(&ns, d.path(), &fake.write_kubeconfig("bad", "nope"));
    let good = run_installer(&ns, d.path(), &fake.kubeconfig());
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(!bad.status.success(), "{bad:?}");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("n1") && err.contains("401"), "{err}");
    assert!(good.status.success(), "{good:?}");
    let taints = fake.with(|st| st.nodes.get("n1").expect("n1").1.clone());
    assert_eq!(
        taints,
        json!([
            {"key": "other", "effect": "NoSchedule"},
            {"key": "late", "effect": "NoExecute"}
        ]),
        "the boot taint is gone, the one added meanwhile is kept"
    );
    let patches: Vec<_> = fake
        .seen()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 2, "one conflict, one retry: {patches:?}");
    let body: serde_json::Value = serde_json::from_str(&patches[1].body).expect("json");
    assert!(
        body["metadata"]["resourceVersion"].is_string(),
        "the patch is conditional: {body}"
    );
}

/// In a pod there is no kubeconfig: the installer finds the API server
/// in KUBERNETES_SERVICE_HOST/PORT and authenticates with the service
/// account's token and CA under /var/run/secrets, as kube-rs reads them.
/// The test gives it those in a private mount namespace (a tmpfs over
/// /run), so nothing of the host's is touched.
#[test]
fn installer_uses_the_in_cluster_service_account() {
    let d = tempfile::tempdir().expect("tempdir");
    let ns = test_netns("csa");
    let fake = FakeKube::start(Some(&ns));
    fake.with(|st| {
        st.add_node(
            "n1",
            json!([{"key": "coil.cybozu.com/bootstrap", "effect": "NoSchedule"}]),
        )
    });
    let sa = d.path().join("sa");
    std::fs::create_dir(&sa).expect("sa dir");
    std::fs::write(sa.join("token"), &fake.token).expect("token");
    std::fs::copy(fake.ca_path(), sa.join("ca.crt")).expect("ca");
    std::fs::write(sa.join("namespace"), "coil-system").expect("namespace");
    let script = "mount -t tmpfs coil-test /run \
        && mkdir -p /run/secrets/kubernetes.io/serviceaccount \
        && cp \"$SA\"/* /run/secrets/kubernetes.io/serviceaccount/ \
        && exec \"$INSTALLER\"";
    let o = installer_command(
        &ns,
        d.path(),
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
        ],
    )
    .env("SA", &sa)
    .env("INSTALLER", INSTALLER)
    .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    .env("KUBERNETES_SERVICE_PORT", fake.port.to_string())
    .env("HOME", d.path())
    .output()
    .expect("installer");
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        fake.with(|st| st.nodes.get("n1").expect("n1").1.clone()),
        json!([]),
        "the boot taint is gone"
    );
    let seen = fake.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|r| r.authorized),
        "every request carried the service account's token: {seen:?}"
    );
}

/// Every setting the manifests give a program is one it reads (a
/// renamed flag would otherwise be silently ignored in a cluster), and the
/// Kubernetes API is reached without a proxy sidecar.
#[test]
fn the_manifests_name_only_settings_the_programs_read() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/coil.yaml"
    ))
    .expect("manifest");
    let mut checked = 0;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("a YAML document");
        let spec = &v["spec"]["template"]["spec"];
        let containers = spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(spec["containers"].as_array().into_iter().flatten());
        for c in containers {
            let cmd: Vec<&str> = c["command"]
                .as_array()
                .expect("command")
                .iter()
                .filter_map(|a| a.as_str())
                .collect();
            assert!(
                cmd.first().is_some_and(|p| p.ends_with("/hypercoil")),
                "every container runs hypercoil (no sidecar): {cmd:?}"
            );
            let help = Command::new(HYPERCOIL)
                .args(&cmd[1..])
                .arg("--help")
                .output()
                .expect("help");
            let help = String::from_utf8_lossy(&help.stdout).to_string();
            for e in c["env"].as_array().into_iter().flatten() {
                let name = e["name"].as_str().expect("env name");
                assert!(help.contains(name), "{cmd:?} does not read {name}:\n{help}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} settings found");
}
