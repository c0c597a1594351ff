//! The etcd adapter keeps a lease alive on one gRPC stream: each
//! keep-alive is a message on it, counted here with etcd's own metrics
//! (an idle node used to open a stream per keep-alive). Real etcd on a
//! private loopback port.

use std::time::Duration;

use coil::store::Backend;
use coil_adapters::etcd::{EtcdBackend, EtcdOptions};
use coil_testkit::{etcd_metric, TestEtcd};

fn streams(endpoint: &str) -> f64 {
    etcd_metric(
        endpoint,
        "grpc_server_started_total",
        &["grpc_method=\"LeaseKeepAlive\""],
    )
    .expect("etcd metrics")
}

#[test]
fn a_lease_is_kept_alive_on_one_stream() {
    let etcd = TestEtcd::start().expect("etcd");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let opts = EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        ..Default::default()
    };
    rt.block_on(async {
        let b = EtcdBackend::connect(&opts).await.expect("connect");
        let id = b.lease_grant(30).await.expect("grant");
        let before = streams(&etcd.endpoint);
        for i in 0..20 {
            let ttl = b.lease_keep_alive(id).await.expect("keep alive");
            assert!(ttl > 0, "keep-alive {i}: lease expired");
        }
        let opened = streams(&etcd.endpoint) - before;
        assert_eq!(opened, 1.0, "20 keep-alives opened {opened} streams");
        // A revoked lease answers 0 (expired), and a new lease gets a
        // stream of its own.
        b.lease_revoke(id).await.expect("revoke");
        assert_eq!(b.lease_keep_alive(id).await.expect("keep alive"), 0);
        let id2 = b.lease_grant(30).await.expect("grant");
        for _ in 0..5 {
            assert!(b.lease_keep_alive(id2).await.expect("keep alive") > 0);
        }
        let opened = streams(&etcd.endpoint) - before;
        assert!(
            opened <= 3.0,
            "{opened} streams for two leases and one expired check"
        );
    });
}

/// A lease that expires while its stream is open answers 0 on that stream
/// (the caller registers anew), and is not kept alive again by accident.
#[test]
fn an_expired_lease_answers_zero_on_its_open_stream() {
    let etcd = TestEtcd::start().expect("etcd");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let opts = EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        ..Default::default()
    };
    rt.block_on(async {
        let b = EtcdBackend::connect(&opts).await.expect("connect");
        let id = b.lease_grant(2).await.expect("grant");
        assert!(b.lease_keep_alive(id).await.expect("keep alive") > 0);
        // Let it expire (TTL 2 s; etcd's minimum TTL may round it up).
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // etcd answers -1 once the lease is gone (0 means under a
            // second left, still alive).
            let left = time_to_live(&etcd.endpoint, id).await;
            if left < 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "lease never expired");
        }
        let ttl = b.lease_keep_alive(id).await.expect("keep alive");
        assert_eq!(ttl, 0, "an expired lease was kept alive (TTL {ttl})");
    });
}

/// The lease's remaining TTL, asked with a client of its own.
async fn time_to_live(endpoint: &str, id: i64) -> i64 {
    let mut c = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("etcd client");
    c.lease_time_to_live(id, None)
        .await
        .map(|r| r.ttl())
        .expect("lease time to live")
}
