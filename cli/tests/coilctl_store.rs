//! `coilctl` against a real etcd (private loopback port) and against the
//! embedded store, run as the user runs it: the binary, env and flags.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use coil::store::{NodeRecord, Store};
use coil_adapters::etcd::{EtcdBackend, EtcdOptions};
use coil_testkit as testkit;
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

    fn cmd(&self) -> Command {
        let mut c = Command::new(COILCTL);
        c.env_clear()
            .env("HOME", self.home.path())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COILCTL_ENDPOINTS", &self.endpoint)
            .env("COILCTL_PREFIX", &self.prefix);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run coilctl")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.run(&a);
        assert!(o.status.success(), "{args:?}: {o:?}");
        serde_json::from_slice(&o.stdout).expect("json")
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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exactly one line on stderr, containing `needle`.
fn one_line_error(o: &Output, code: i32, needle: &str) {
    assert_eq!(o.status.code(), Some(code), "{o:?}");
    let e = stderr(o);
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    assert!(e.contains(needle), "{e:?} should contain {needle:?}");
    assert!(o.stdout.is_empty(), "nothing on stdout: {o:?}");
}

#[test]
fn pool_lifecycle_through_the_binary() {
    let c = Ctl::new("ctl-pool");
    let o = c.run(&[
        "pool",
        "create",
        "default",
        "10.70.0.0/24",
        "--block-size",
        "5",
    ]);
    assert!(o.status.success(), "{o:?}");
    // v1's positional form.
    let o = c.run(&["pool", "create", "team-a", "10.71.0.0/24", "4"]);
    assert!(o.status.success(), "{o:?}");
    let o = c.run(&["pool", "create", "v6", "fd00:70::/112", "-s", "8"]);
    assert!(o.status.success(), "{o:?}");
    let o = c.run(&["pool", "add-subnet", "default", "10.70.1.0/25"]);
    assert!(o.status.success(), "{o:?}");

    let list = c.json(&["pool", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["pool"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["default", "team-a", "v6"]);
    assert_eq!(list[0]["blocks"], 12);
    assert_eq!(list[2]["family"], "ipv6");

    let o = c.run(&["pool", "list"]);
    let text = String::from_utf8_lossy(&o.stdout);
    let header = text.lines().next().expect("header");
    assert!(header.starts_with("NAME"), "{text}");
    // Columns line up: every row has FAMILY where the header has it.
    let col = header.find("FAMILY").expect("FAMILY column");
    for line in text.lines().skip(1) {
        assert!(line[col..].starts_with("ipv"), "{text}");
    }

    let show = c.json(&["pool", "show", "default"]);
    assert_eq!(show["blocks"], 12);
    assert_eq!(show["free"], 12);
    assert_eq!(show["subnets"][1]["subnet"], "10.70.1.0/25");

    let o = c.run(&["pool", "remove", "team-a"]);
    assert!(o.status.success(), "{o:?}");
    let o = c.run(&["pool", "show", "team-a"]);
    one_line_error(&o, 1, "pool team-a not found");
}

#[test]
fn dual_stack_pool_through_the_binary() {
    let c = Ctl::new("ctl-dual");
    let created = c.json(&[
        "pool",
        "create",
        "default",
        "10.72.0.0/24",
        "--ipv6",
        "fd00:72::/112",
        "--block-size",
        "5",
        "--ipv6-block-size",
        "8",
    ]);
    assert_eq!(created["families"], serde_json::json!(["ipv4", "ipv6"]));
    assert_eq!(created["ipv6"]["block_size"], 8);
    assert_eq!(created["ipv6"]["blocks"], 256);
    assert_eq!(created["blocks"], 8 + 256);
    // The IPv6 part grows; a single-family pool refuses the other family.
    let o = c.run(&["pool", "add-subnet", "default", "fd00:73::/112"]);
    assert!(o.status.success(), "{o:?}");
    let o = c.run(&["pool", "create", "v4only", "10.73.0.0/24", "-s", "5"]);
    assert!(o.status.success(), "{o:?}");
    let o = c.run(&["pool", "add-subnet", "v4only", "fd00:74::/112"]);
    one_line_error(&o, 2, "ipv4 only");
    // With a block size for its blocks, the new family makes it dual-stack.
    let grown = c.json(&[
        "pool",
        "add-subnet",
        "v4only",
        "fd00:74::/112",
        "--block-size",
        "8",
    ]);
    assert_eq!(
        grown["families"],
        serde_json::json!(["ipv4", "ipv6"]),
        "{grown}"
    );
    assert_eq!(grown["ipv6"]["block_size"], 8, "{grown}");
    // Bad dual-stack input: exit 2, nothing created.
    let o = c.run(&[
        "pool",
        "create",
        "bad",
        "10.74.0.0/24",
        "--ipv6",
        "10.75.0.0/24",
        "-s",
        "5",
    ]);
    one_line_error(&o, 2, "not an IPv6 subnet");
    let o = c.run(&[
        "pool",
        "create",
        "bad",
        "10.74.0.0/24",
        "-s",
        "5",
        "--ipv6-block-size",
        "8",
    ]);
    one_line_error(&o, 2, "no IPv6 subnet");
    let o = c.run(&["pool", "show", "bad"]);
    one_line_error(&o, 1, "pool bad not found");

    let show = c.json(&["pool", "show", "default"]);
    assert_eq!(show["blocks"], 8 + 512);
    let subnets: Vec<&str> = show["subnets"]
        .as_array()
        .expect("subnets")
        .iter()
        .filter_map(|s| s["subnet"].as_str())
        .collect();
    assert_eq!(subnets, ["10.72.0.0/24", "fd00:72::/112", "fd00:73::/112"]);
    let o = c.run(&["pool", "show", "default"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("ipv4+ipv6 (dual-stack)"), "{text}");
    assert!(text.contains("ipv6 8 (256 addresses, /120)"), "{text}");
    let o = c.run(&["pool", "list"]);
    let text = String::from_utf8_lossy(&o.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("default"))
        .expect("default row");
    assert!(row.contains("ipv4+ipv6") && row.contains("5/8"), "{text}");
}

#[test]
fn bad_input_is_one_line_exit_2_and_changes_nothing() {
    let c = Ctl::new("ctl-bad");
    let o = c.run(&[
        "pool",
        "create",
        "default",
        "10.72.0.0/24",
        "--block-size",
        "5",
    ]);
    assert!(o.status.success(), "{o:?}");
    let before = c.json(&["pool", "show", "default"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["pool", "create", "Bad_Name", "10.73.0.0/24", "-s", "5"],
            "bad pool name",
        ),
        (
            &["pool", "create", "x", "10.73.0.0/24", "-s", "25"],
            "out of range for ipv4",
        ),
        (
            &["pool", "create", "x", "fd00::/64", "-s", "40"],
            "out of range for ipv6",
        ),
        (
            &["pool", "create", "x", "10.73.0.0/33", "-s", "5"],
            "malformed subnet",
        ),
        (
            &["pool", "create", "x", "10.73.0.1/24", "-s", "5"],
            "host bits set",
        ),
        (
            &["pool", "create", "x", "10.73.0.0/24"],
            "missing block size",
        ),
        (
            &["pool", "add-subnet", "default", "banana"],
            "malformed subnet",
        ),
        (
            &["pool", "create", "x", "169.254.0.0/24", "-s", "4"],
            "overlaps the reserved range 169.254.0.0/16 (link-local, which holds coil's pod gateway",
        ),
        (
            &["pool", "create", "x", "fe80::/112", "-s", "8"],
            "overlaps the reserved range fe80::/10 (link-local",
        ),
        (
            &["pool", "add-subnet", "default", "127.0.0.0/24"],
            "overlaps the reserved range 127.0.0.0/8 (loopback",
        ),
        (&["address", "info", "10.1.2"], "malformed address"),
        (
            &["block", "release", "--node", "bad/node", "10.72.0.0/27"],
            "bad node name",
        ),
        (&["--etcd-timeout", "soon", "pool", "list"], "bad duration"),
        (
            &["--etcd-endpoints", "127.0.0.1:2379", "pool", "list"],
            "must be a URL",
        ),
    ];
    for (args, needle) in cases {
        let o = c.run(args);
        one_line_error(&o, 2, needle);
    }
    // Store-level refusals: exit 1, one line, nothing changed.
    let o = c.run(&["pool", "create", "other", "10.72.0.128/25", "-s", "4"]);
    one_line_error(&o, 1, "overlaps 10.72.0.0/24 of pool default");
    let o = c.run(&["pool", "create", "other", "10.0.0.0/8", "-s", "12"]);
    one_line_error(&o, 1, "overlaps");
    let o = c.run(&["pool", "add-subnet", "nope", "10.74.0.0/24"]);
    one_line_error(&o, 1, "pool nope not found");
    let o = c.run(&["pool", "create", "default", "10.75.0.0/24", "-s", "5"]);
    one_line_error(&o, 1, "already exists");
    assert_eq!(c.json(&["pool", "show", "default"]), before);
    assert_eq!(c.json(&["pool", "list"]).as_array().map(Vec::len), Some(1));
}

#[test]
fn unreachable_etcd_is_exit_3_naming_the_endpoint() {
    let c = Ctl::new("ctl-down");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let ep = format!("http://127.0.0.1:{port}");
    let o = c.run(&[
        "--etcd-endpoints",
        &ep,
        "--etcd-timeout",
        "1s",
        "pool",
        "list",
    ]);
    one_line_error(&o, 3, &ep);
    let o = c.run(&[
        "--etcd-endpoints",
        &ep,
        "--etcd-timeout",
        "1s",
        "pool",
        "create",
        "default",
        "10.76.0.0/24",
        "-s",
        "5",
    ]);
    one_line_error(&o, 3, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_blocks_addresses_and_fenced_release() {
    let c = Ctl::new("ctl-nodes");
    let o = c.run(&["pool", "create", "default", "10.77.0.0/24", "-s", "5"]);
    assert!(o.status.success(), "{o:?}");
    let s = c.store().await;
    let rec = NodeRecord {
        node: "alive-1".into(),
        boot_id: "b-1".into(),
        started_unix: 1_700_000_000,
        version: "test".into(),
    };
    let _lease = s.register_node(&rec, 60).await.expect("register");
    let a = s
        .acquire_block("default", "alive-1")
        .await
        .expect("acquire");
    let d = s.acquire_block("default", "dead-1").await.expect("acquire");

    let nodes = c.json(&["node", "list"]);
    let find = |n: &str| {
        nodes
            .as_array()
            .expect("array")
            .iter()
            .find(|x| x["node"] == n)
            .cloned()
            .expect("listed")
    };
    assert_eq!(find("alive-1")["alive"], true);
    assert_eq!(find("alive-1")["blocks"], 1);
    assert_eq!(find("dead-1")["alive"], false);
    let o = c.run(&["node", "list"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("dead-1") && l.contains("dead")),
        "{text}"
    );

    let blocks = c.json(&["node", "blocks", "alive-1"]);
    assert_eq!(blocks[0]["block"], a.block.to_string());
    assert_eq!(blocks[0]["epoch"], a.epoch);

    let addr = a.block.network().to_string();
    let info = c.json(&["address", "info", &addr]);
    assert_eq!(info["pool"], "default");
    assert_eq!(info["lease"]["node"], "alive-1");
    let o = c.run(&["address", "info", "192.0.2.1"]);
    assert_eq!(o.status.code(), Some(1));

    let block = a.block.to_string();
    let o = c.run(&["block", "release", "--node", "alive-1", &block]);
    one_line_error(&o, 1, "is alive");
    let o = c.run(&["block", "release", "--node", "dead-1", &block]);
    one_line_error(&o, 1, "leased by alive-1, not dead-1");
    let o = c.run(&["block", "release", "--node", "alive-1", &block, "--force"]);
    assert!(o.status.success(), "{o:?}");
    let o = c.run(&["block", "release", "--node", "dead-1", &d.block.to_string()]);
    assert!(o.status.success(), "dead node's block: {o:?}");
    assert!(s.all_blocks().await.expect("blocks").is_empty());
    let o = c.run(&["pool", "remove", "default"]);
    assert!(o.status.success(), "{o:?}");
}

#[test]
fn config_file_and_precedence() {
    let c = Ctl::new("ctl-config");
    // ~/.coilctl.yml names the right etcd and prefix; env is cleared.
    std::fs::write(
        c.home.path().join(".coilctl.yml"),
        format!(
            "endpoints:\n  - {}\nprefix: {}\ntimeout: 3s\n",
            c.endpoint, c.prefix
        ),
    )
    .expect("write config");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(COILCTL);
        cmd.env_clear().env("HOME", c.home.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args).output().expect("run")
    };
    let o = run(
        &["pool", "create", "default", "10.78.0.0/24", "-s", "5"],
        &[],
    );
    assert!(o.status.success(), "{o:?}");
    // The created pool is visible under the prefix the file named.
    let o = c.run(&["pool", "list", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v[0]["pool"], "default");
    // Env beats the file; a flag beats env.
    let o = run(
        &["pool", "list"],
        &[
            ("COILCTL_ENDPOINTS", "http://127.0.0.1:1"),
            ("COILCTL_TIMEOUT", "1s"),
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let o = run(
        &["--etcd-endpoints", &c.endpoint, "pool", "list"],
        &[("COILCTL_ENDPOINTS", "http://127.0.0.1:1")],
    );
    assert!(o.status.success(), "{o:?}");
    // A broken config file is bad input.
    std::fs::write(c.home.path().join(".coilctl.yml"), "endpoint: [\n").expect("write");
    let o = run(&["pool", "list"], &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

#[test]
fn completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(COILCTL)
            .args(["completion", shell])
            .output()
            .expect("run");
        assert!(o.status.success(), "{shell}: {o:?}");
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(s.contains("coilctl") && s.contains("add-subnet"), "{shell}");
    }
}

#[test]
fn embedded_store_offline_and_locked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jdir = dir.path().join("journal");
    let run = |args: &[&str]| {
        Command::new(COILCTL)
            .env_clear()
            .env("HOME", dir.path())
            .env("COILCTL_STORE", "embedded")
            .env("COILCTL_JOURNAL_DIR", &jdir)
            .args(args)
            .output()
            .expect("run")
    };
    let o = run(&["pool", "create", "default", "10.79.0.0/24", "-s", "5"]);
    assert!(o.status.success(), "{o:?}");
    let o = run(&["pool", "create", "other", "10.79.0.0/25", "-s", "5"]);
    one_line_error(&o, 1, "overlaps");
    let o = run(&["pool", "show", "default", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["blocks"], 8);
    // While another process (coild) holds the journal, coilctl says so.
    let j = Arc::new(coil::journal::Journal::open(&jdir).expect("hold journal"));
    let o = run(&["pool", "list"]);
    one_line_error(&o, 3, "socket does not answer");
    drop(j);
    // The journal tools see the store's entries too.
    let o = Command::new(COILCTL)
        .args(["journal", "verify", "--dir"])
        .arg(Path::new(&jdir))
        .output()
        .expect("run");
    assert!(o.status.success(), "{o:?}");
}
