//! The etcd adapter against a 3-member TLS cluster (coil_testkit's
//! EtcdCluster): requests survive one member killed or partitioned away,
//! fail as "unavailable" (naming every member tried) without quorum, and
//! a wrong client certificate is a prompt, clear error. Needs root.

use std::time::{Duration, Instant};

use coil::store::backend::{BackendErrorKind, Op, Txn};
use coil::store::Backend;
use coil_adapters::etcd::{EtcdBackend, EtcdOptions, TlsPem};
use coil_testkit::EtcdCluster;

/// A client namespace attached to the cluster's hub, and a runtime whose
/// threads live in it (so every socket the client opens is there). The
/// namespace is deleted on drop.
struct ClientNetns {
    name: String,
    rt: Option<tokio::runtime::Runtime>,
}

impl ClientNetns {
    fn new(c: &mut EtcdCluster, tag: &str) -> ClientNetns {
        let name = format!("ecb{}{tag}", std::process::id() % 100_000);
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success());
        let mut n = ClientNetns { name, rt: None };
        c.attach(&n.name).expect("attach");
        let path = format!("/run/netns/{}", n.name);
        n.rt = Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start(move || {
                    let fd = std::fs::File::open(&path).expect("open netns");
                    nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                })
                .build()
                .expect("runtime"),
        );
        n
    }

    /// Runs `f` on the namespace's runtime.
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let rt = self.rt.as_ref().expect("runtime");
        rt.block_on(rt.spawn(f)).expect("client task")
    }
}

impl Drop for ClientNetns {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn opts(c: &EtcdCluster, cert: &std::path::Path, key: &std::path::Path) -> EtcdOptions {
    let read = |p: &std::path::Path| std::fs::read(p).expect("pem");
    EtcdOptions {
        endpoints: c.endpoints(),
        timeout: Duration::from_secs(1),
        username: None,
        password: None,
        tls: Some(TlsPem {
            ca: Some(read(&c.tls.ca)),
            cert: Some(read(cert)),
            key: Some(read(key)),
        }),
    }
}

/// Puts `key` then reads it back; the time it took.
async fn put_get(b: &EtcdBackend, key: &str) -> Result<Duration, String> {
    let t = Instant::now();
    b.txn(
        "test put",
        Txn {
            then: vec![Op::put(key, "v")],
            ..Default::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut r = b
        .txn("test get", Txn::read(vec![Op::get(key)]))
        .await
        .map_err(|e| e.to_string())?;
    if r.kvs(0).len() != 1 {
        return Err(format!("{key} not found after the put"));
    }
    Ok(t.elapsed())
}

/// Puts until one succeeds, for at most `limit` (a write that timed out is
/// not retried by the adapter, and losing the leader stalls writes for an
/// election: the store layer re-reads and tries again).
async fn put_get_retrying(b: &EtcdBackend, key: &str, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let mut errs = Vec::new();
    for _ in 0..20 {
        match put_get(b, key).await {
            Ok(_) => return Ok(t.elapsed()),
            Err(e) => errs.push(e),
        }
        if t.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(errs.join(" / "))
}

#[test]
fn requests_survive_a_dead_or_cut_off_member_and_fail_without_quorum() {
    let mut c = EtcdCluster::new().expect("cluster");
    let client = ClientNetns::new(&mut c, "a");
    let o = opts(&c, &c.tls.cert.clone(), &c.tls.key.clone());
    let b = client
        .run(async move { EtcdBackend::connect(&o).await })
        .expect("connect");
    let b2 = b.clone();
    client
        .run(async move { put_get(&b2, "/t/a").await })
        .expect("healthy cluster");

    // Member 0 (the preferred one) killed: requests fail over to the
    // others. A write racing the kill on the old connection may fail once
    // (it may have been applied: not retried), the next one lands. When
    // member 0 led, the others first elect a leader ("no leader" until
    // then): etcd's 1 s election timeout, several rounds on a loaded
    // machine (CI once needed more than 3 s), so the same 8 s as a
    // partitioned leader below.
    c.kill(0);
    let b2 = b.clone();
    let d = client
        .run(async move { put_get_retrying(&b2, "/t/b", Duration::from_secs(8)).await })
        .expect("one member dead");
    eprintln!("member 0 killed: a write landed after {d:?}");
    assert!(d < Duration::from_secs(8), "took {d:?}");
    // Reads never fail while a member is down.
    for k in 0..5 {
        let b2 = b.clone();
        let r =
            client.run(async move { b2.txn("test get", Txn::read(vec![Op::get("/t/b")])).await });
        assert!(r.is_ok(), "read {k}: {r:?}");
    }
    c.start(0).expect("restart");
    c.wait_healthy(&[0, 1, 2], Duration::from_secs(30))
        .expect("healthy again");

    // Every member partitioned in turn: each write either lands or fails
    // as unavailable after one deadline, and the next one lands.
    for i in 0..3 {
        c.partition(i).expect("partition");
        let b2 = b.clone();
        let key = format!("/t/p{i}");
        let d = client
            .run(async move { put_get_retrying(&b2, &key, Duration::from_secs(8)).await })
            .unwrap_or_else(|e| panic!("member {i} partitioned: {e}"));
        eprintln!("member {i} partitioned: a write landed after {d:?}");
        assert!(d < Duration::from_secs(8), "member {i}: took {d:?}");
        // Reads are retried on the next member: they do not fail.
        let b2 = b.clone();
        let r =
            client.run(async move { b2.txn("test get", Txn::read(vec![Op::get("/t/a")])).await });
        assert!(r.is_ok(), "member {i} partitioned, read: {r:?}");
        c.heal(i).expect("heal");
        c.wait_healthy(&[0, 1, 2], Duration::from_secs(30))
            .expect("healthy again");
    }

    // Quorum lost: unavailable, promptly, naming the members tried.
    c.kill(1);
    c.partition(2).expect("partition");
    let b2 = b.clone();
    let (r, took) = client.run(async move {
        let t = Instant::now();
        let r = b2.txn("test get", Txn::read(vec![Op::get("/t/a")])).await;
        (r, t.elapsed())
    });
    let e = r.expect_err("no quorum");
    assert_eq!(e.kind, BackendErrorKind::Unavailable, "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {e}");
    assert_eq!(e.op, "test get");
    assert_eq!(e.key, "/t/a");
    for ep in c.endpoints() {
        assert!(e.to_string().contains(&ep), "{ep} not named: {e}");
    }

    // Back: the same client works again.
    c.start(1).expect("restart");
    c.heal(2).expect("heal");
    c.wait_healthy(&[0, 1, 2], Duration::from_secs(30))
        .expect("healthy again");
    let b2 = b.clone();
    client
        .run(async move { put_get_retrying(&b2, "/t/z", Duration::from_secs(10)).await })
        .expect("healed");
}

#[test]
fn a_wrong_client_certificate_is_a_prompt_tls_error() {
    let mut c = EtcdCluster::new().expect("cluster");
    let client = ClientNetns::new(&mut c, "b");
    let mut cases = vec![(
        "rogue",
        opts(&c, &c.tls.rogue_cert.clone(), &c.tls.rogue_key.clone()),
    )];
    let mut none = opts(&c, &c.tls.cert.clone(), &c.tls.key.clone());
    if let Some(t) = none.tls.as_mut() {
        t.cert = None;
        t.key = None;
    }
    cases.push(("no certificate", none));
    for (what, o) in cases {
        let (r, took) = client.run(async move {
            let t = Instant::now();
            let r = match EtcdBackend::connect(&o).await {
                Ok(b) => b
                    .txn("test get", Txn::read(vec![Op::get("/t/a")]))
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            (r, t.elapsed())
        });
        let e = r.expect_err(what);
        assert!(took < Duration::from_secs(5), "{what}: took {took:?}: {e}");
        let m = e.to_string().to_lowercase();
        assert!(m.contains("certificate"), "{what}: not a TLS error: {e}");
    }
}

/// A lease is kept alive on one open stream; when that stream's member is
/// cut off (the leader too, so an election runs), a keep-alive soon goes
/// through on a new stream on another member, well within the lease's TTL,
/// and the lease never expires.
#[test]
fn keep_alive_moves_to_another_member_when_its_stream_is_cut_off() {
    let mut c = EtcdCluster::new().expect("cluster");
    let client = ClientNetns::new(&mut c, "ka");
    let o = opts(&c, &c.tls.cert.clone(), &c.tls.key.clone());
    let b = client.run(async move { EtcdBackend::connect(&o).await.expect("connect") });
    let b2 = b.clone();
    let id = client.run(async move { b2.lease_grant(15).await.expect("grant") });
    // Cut each member in turn (one holds the stream; one is the leader):
    // the lease must live through all of it.
    for victim in 0..3 {
        let b2 = b.clone();
        let ttl = client.run(async move { b2.lease_keep_alive(id).await.expect("keep alive") });
        assert!(ttl > 0, "lease expired before member {victim} was cut off");
        c.partition(victim).expect("partition");
        let b2 = b.clone();
        let (res, took) = client.run(async move {
            // Like coild's liveness task, which tries again every TTL/3:
            // bounded here by 8 s, half the TTL.
            let t = Instant::now();
            let mut errs = Vec::new();
            while t.elapsed() < Duration::from_secs(8) {
                match b2.lease_keep_alive(id).await {
                    Ok(ttl) => return (Ok(ttl), t.elapsed()),
                    Err(e) => errs.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (Err(errs.join(" / ")), t.elapsed())
        });
        let ttl = res.unwrap_or_else(|e| panic!("keep-alive with member {victim} cut off: {e}"));
        assert!(
            ttl > 0,
            "the lease expired with member {victim} cut off (after {took:?})"
        );
        c.heal(victim).expect("heal");
        c.wait_healthy(&[0, 1, 2], Duration::from_secs(30))
            .expect("healthy again");
    }
}
