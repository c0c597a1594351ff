//! `coilctl` over a store with bad entries (real etcd): the listing commands
//! still do their job, show what they skipped on stderr and exit 0;
//! `store check` lists every bad entry and exits 1; nothing is deleted.

use std::process::{Command, Output};

use coil::store::backend::{Op, Txn};
use coil::store::{Backend, Store};
use coil_adapters::etcd::{EtcdBackend, EtcdOptions};
use coil_testkit as testkit;
use ipnet::IpNet;
use serde_json::Value;

const COILCTL: &str = env!("CARGO_BIN_EXE_coilctl");

struct Ctl {
    endpoint: String,
    prefix: String,
    home: tempfile::TempDir,
}

impl Ctl {
    fn new(tag: &str) -> Ctl {
        Ctl {
            endpoint: testkit::shared_etcd().expect("etcd for tests"),
            prefix: testkit::unique_prefix(tag),
            home: tempfile::tempdir().expect("home"),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(COILCTL)
            .env_clear()
            .env("HOME", self.home.path())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COILCTL_ENDPOINTS", &self.endpoint)
            .env("COILCTL_PREFIX", &self.prefix)
            .args(args)
            .output()
            .expect("run coilctl")
    }

    async fn store(&self) -> Store<EtcdBackend> {
        let b = EtcdBackend::connect(&EtcdOptions {
            endpoints: vec![self.endpoint.clone()],
            ..Default::default()
        })
        .await
        .expect("connect");
        Store::open(b, &self.prefix).await.expect("open")
    }
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

async fn put_raw(s: &Store<EtcdBackend>, key: &str, value: &[u8]) {
    s.backend()
        .txn(
            "test",
            Txn::read(vec![Op::put(key.to_string(), value.to_vec())]),
        )
        .await
        .expect("write");
}

async fn keys(s: &Store<EtcdBackend>) -> Vec<(String, Vec<u8>)> {
    let mut r = s
        .backend()
        .txn("snapshot", Txn::read(vec![Op::prefix(s.keys().prefix())]))
        .await
        .expect("snapshot");
    r.kvs(0)
        .into_iter()
        .map(|kv| (kv.key_str(), kv.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_show_bad_entries_and_check_fails_on_them() {
    let c = Ctl::new("ctl-bad");
    let o = c.run(&[
        "pool",
        "create",
        "default",
        "10.64.0.0/24",
        "--block-size",
        "5",
    ]);
    assert!(o.status.success(), "{o:?}");
    let s = c.store().await;
    let good = s
        .acquire_specific("default", net("10.64.0.0/27"), "node-1")
        .await
        .expect("good lease");
    let k = s.keys().clone();
    let everything = k.block("default", &net("0.0.0.0/0"));
    let foreign = k.block("default", &net("10.64.0.64/27"));
    let garbage = format!("{}zz", k.pool_blocks("default"));
    let bad_pool = k.pool("broken");
    let bad_node = k.node("node-7");
    put_raw(
        &s,
        &everything,
        br#"{"pool":"default","block":"0.0.0.0/0","node":"node-1","acquired_unix":1}"#,
    )
    .await;
    put_raw(
        &s,
        &foreign,
        br#"{"pool":"other","block":"10.65.0.0/27","node":"node-1","acquired_unix":1}"#,
    )
    .await;
    put_raw(&s, &garbage, b"garbage").await;
    put_raw(&s, &bad_pool, b"{").await;
    put_raw(&s, &bad_node, b"[]").await;
    let before = keys(&s).await;
    let block_keys = [&everything, &foreign, &garbage];

    // pool show: the good lease, the occupied block, the bad entries on
    // stderr; exit 0.
    let o = c.run(&["pool", "show", "default"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(out(&o).contains(&good.block.to_string()), "{}", out(&o));
    assert!(
        out(&o).contains("1 leased, 1 occupied by bad entries, 6 free, 8 total"),
        "{}",
        out(&o)
    );
    for key in block_keys {
        assert!(err(&o).contains(key.as_str()), "{key} in {}", err(&o));
    }
    assert!(err(&o).contains("is a /0"), "{}", err(&o));
    assert!(
        !out(&o).contains("0.0.0.0/0"),
        "a bad block shown as a lease"
    );

    let o = c.run(&["--json", "pool", "show", "default"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    let bad: Vec<&str> = v["bad_entries"]
        .as_array()
        .expect("bad_entries")
        .iter()
        .filter_map(|b| b["key"].as_str())
        .collect();
    assert_eq!(bad.len(), 3, "{v}");
    assert_eq!(v["leases"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["free"], 6);

    // node blocks: the good block on stdout, the bad ones on stderr.
    let o = c.run(&["node", "blocks", "node-1"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(out(&o).contains(&good.block.to_string()));
    assert!(!out(&o).contains("0.0.0.0/0"));
    for key in block_keys {
        assert!(err(&o).contains(key.as_str()), "{key} in {}", err(&o));
    }

    // node list: node-1 with its one valid block; the bad liveness entry.
    let o = c.run(&["node", "list"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let line = out(&o)
        .lines()
        .find(|l| l.starts_with("node-1"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.split_whitespace().nth(2) == Some("1"), "{line:?}");
    assert!(err(&o).contains(bad_node.as_str()), "{}", err(&o));

    // pool list: the good pool; the bad one on stderr.
    let o = c.run(&["pool", "list"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(out(&o).contains("default"));
    assert!(!out(&o).contains("broken"));
    assert!(err(&o).contains(bad_pool.as_str()), "{}", err(&o));

    // store check: every bad entry, exit 1.
    let o = c.run(&["store", "check"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    for key in [&everything, &foreign, &garbage, &bad_pool, &bad_node] {
        assert!(out(&o).contains(key.as_str()), "{key} in {}", out(&o));
    }
    let o = c.run(&["--json", "store", "check"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["bad_entries"].as_array().map(Vec::len), Some(5), "{v}");

    assert_eq!(
        keys(&s).await,
        before,
        "a read-only command changed the store"
    );

    // Once an administrator removed them, the check passes.
    for key in [&everything, &foreign, &garbage, &bad_pool, &bad_node] {
        s.backend()
            .txn(
                "test",
                Txn::read(vec![Op::Delete {
                    key: key.as_bytes().to_vec(),
                }]),
            )
            .await
            .expect("delete");
    }
    let o = c.run(&["store", "check"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(out(&o).starts_with("ok:"), "{}", out(&o));
    let o = c.run(&["pool", "show", "default"]);
    assert!(err(&o).is_empty(), "{}", err(&o));
}
