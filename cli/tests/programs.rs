//! The binaries as a user runs them: hypercoil dispatch, the programs that
//! are not there yet, and `coilctl journal dump/verify` on real journals.

use std::path::Path;
use std::process::{Command, Output};

use coil::journal::*;
use serde_json::Value;

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().expect("run binary")
}

const HYPERCOIL: &str = env!("CARGO_BIN_EXE_hypercoil");
const COILCTL: &str = env!("CARGO_BIN_EXE_coilctl");

#[test]
fn hypercoil_dispatches_on_first_argument_and_on_argv0() {
    let o = run(HYPERCOIL, &["coilctl", "--version"]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("coilctl "));

    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("coilctl");
    std::os::unix::fs::symlink(HYPERCOIL, &link).expect("symlink");
    let o = Command::new(&link).arg("--version").output().expect("run");
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("coilctl "));

    let o = run(HYPERCOIL, &["no-such-program"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown program"));
    let o = run(HYPERCOIL, &[]);
    assert_eq!(o.status.code(), Some(2));
}

/// Each program's own binary.
fn binary(p: &str) -> &'static str {
    match p {
        "coil" => env!("CARGO_BIN_EXE_coil"),
        "coild" => env!("CARGO_BIN_EXE_coild"),
        "coilctl" => COILCTL,
        "coil-controller" => env!("CARGO_BIN_EXE_coil-controller"),
        "coil-installer" => env!("CARGO_BIN_EXE_coil-installer"),
        other => panic!("no binary for {other}"),
    }
}

#[test]
fn every_program_prints_help_and_version_and_does_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = dir.path().join("bin");
    let etc_dir = dir.path().join("net.d");
    let conf = r#"{"cniVersion":"1.0.0","name":"k","plugins":[{"type":"coil"}]}"#;
    let link_dir = tempfile::tempdir().expect("tempdir");
    for p in coil::PROGRAMS {
        let link = link_dir.path().join(p);
        std::os::unix::fs::symlink(HYPERCOIL, &link).expect("symlink");
        let link = link.to_str().expect("utf-8").to_string();
        for (how, bin, pre) in [
            ("hypercoil", HYPERCOIL, vec![p]),
            ("direct", binary(p), vec![]),
            ("argv[0]", link.as_str(), vec![]),
        ] {
            for flag in ["--help", "-h", "--version", "-V"] {
                let mut args = pre.clone();
                args.push(flag);
                // The installer would install with this environment (up
                // to finding no binary to copy in the empty COIL_PATH, so
                // a regression never reaches the host's sysctls), and the
                // plugin would send an ADD: neither may happen.
                let o = Command::new(bin)
                    .args(&args)
                    .env("COIL_PATH", link_dir.path().join("empty"))
                    .env("CNI_BIN_DIR", &bin_dir)
                    .env("CNI_ETC_DIR", &etc_dir)
                    .env("CNI_NETCONF", conf)
                    .env("CNI_COMMAND", "ADD")
                    .stdin(std::process::Stdio::null())
                    .output()
                    .expect("run");
                let out = String::from_utf8_lossy(&o.stdout);
                assert!(o.status.success(), "{how} {p} {flag}: {o:?}");
                if flag.starts_with("-V") || flag == "--version" {
                    assert!(out.starts_with(&format!("{p} ")), "{how} {p} {flag}: {out}");
                } else {
                    assert!(
                        out.to_lowercase().contains("usage:"),
                        "{how} {p} {flag}: {out}"
                    );
                }
                assert!(
                    !bin_dir.exists() && !etc_dir.exists(),
                    "{how} {p} {flag} installed something"
                );
            }
        }
    }
    let o = run(HYPERCOIL, &["--help"]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("coil-installer"));
    // The installer's help lists its environment; it takes no arguments.
    let o = run(HYPERCOIL, &["coil-installer", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("CNI_CONF_NAME"));
    let o = Command::new(HYPERCOIL)
        .args(["coil-installer", "--bogus"])
        .env("COIL_PATH", link_dir.path().join("empty"))
        .env("CNI_BIN_DIR", &bin_dir)
        .env("CNI_ETC_DIR", &etc_dir)
        .env("CNI_NETCONF", conf)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(!bin_dir.exists() && !etc_dir.exists());
}

#[test]
fn every_program_answers_help_and_refuses_bad_input() {
    let o = Command::new(HYPERCOIL)
        .args(["coil-controller", "--grace-period", "soon"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = Command::new(HYPERCOIL)
        .args(["coil-controller", "--kube-max-deleted-fraction", "2"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = Command::new(HYPERCOIL)
        .arg("coil-installer")
        .env("CNI_NETCONF_FILE", "/nonexistent/net.json")
        .env_remove("CNI_NETCONF")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(o.stdout.is_empty());
    let o = run(
        COILCTL,
        &[
            "node",
            "repair",
            "--journal-dir",
            "/nonexistent/journal",
            "--socket",
            "/nonexistent/coild.sock",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no journal"), "{err}");
    // One sentence, no run of blanks from a broken line continuation.
    assert!(
        err.contains("use --journal-dir, or --rebuild to create one"),
        "{err}"
    );
    assert!(!err.contains("   "), "{err:?}");
}

#[test]
fn coild_refuses_to_guess_its_store() {
    let o = Command::new(HYPERCOIL)
        .arg("coild")
        .env_remove("COILD_STORE")
        .env("COILD_CONFIG", "/nonexistent/coild.yml")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(o.stdout.is_empty());
    let o = Command::new(HYPERCOIL)
        .args(["coild", "--store", "embedded"])
        .env("COILD_CONFIG", "/nonexistent/coild.yml")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "missing config file: {o:?}");
    let o = run(HYPERCOIL, &["coild", "--store", "etcd"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--etcd-endpoints"));
}

/// coild, coilctl and the controller resolve their etcd settings in one
/// place: the same mistakes get the same message from each, before
/// anything connects.
#[test]
fn the_three_programs_check_etcd_settings_alike() {
    let cases: [(&[&str], &str); 3] = [
        (&["--etcd-endpoints", "127.0.0.1:2379"], "must be a URL"),
        (
            &[
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--etcd-username",
                "u",
            ],
            "both a username and a password",
        ),
        (
            &[
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--etcd-tls-cert",
                "/nonexistent/c.pem",
            ],
            "reading TLS certificate /nonexistent/c.pem",
        ),
    ];
    for (flags, want) in cases {
        for program in [
            vec!["coild", "--store", "etcd"],
            vec!["coilctl", "pool", "list"],
            vec!["coil-controller"],
        ] {
            let mut args = program.clone();
            args.extend_from_slice(flags);
            let o = Command::new(HYPERCOIL)
                .args(&args)
                .env("COILD_CONFIG", "/dev/null")
                .env("COILCTL_CONFIG", "/dev/null")
                .output()
                .expect("run");
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
            assert!(err.contains(want), "{args:?} should say {want:?}: {err}");
        }
    }
}

#[test]
fn plugin_without_environment_is_a_cni_error_on_stdout() {
    // The CNI plugin's stdout is protocol: a CNI error object.
    let o = Command::new(HYPERCOIL)
        .arg("coil")
        .env_remove("CNI_COMMAND")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).expect("CNI error JSON on stdout");
    assert_eq!(v["code"], 4);
    assert!(o.stderr.is_empty(), "no logs: {o:?}");
}

fn make_journal(dir: &Path) {
    let j = Journal::open(dir).expect("open");
    let block: ipnet::IpNet = "10.0.1.0/28".parse().expect("net");
    let key = AttachmentKey::new("k8s", "c0ffee", "eth0");
    let addr: std::net::IpAddr = "10.0.1.3".parse().expect("addr");
    let mut b = Batch::new();
    b.put_node_meta(&NodeMeta {
        node_name: "node-1".into(),
        boot_id: "boot".into(),
        cluster_id: "cluster".into(),
        created_unix: 1,
    })
    .put_lease(&BlockLease {
        pool: "default".into(),
        block,
        epoch: 3,
        state: LeaseState::Leased,
        alloc_cursor: 4,
    })
    .put_attachment(&Attachment {
        key: key.clone(),
        netns: "/run/netns/p".into(),
        pod_namespace: "default".into(),
        pod_name: "p".into(),
        pool: "default".into(),
        addresses: vec![AssignedAddress { addr, block }],
        host_veth: "veth0123".into(),
        state: AttachmentState::Wired,
        boot_id: "boot".into(),
        created_unix: 2,
    })
    .put_address(
        addr,
        &AddressEntry {
            attachment: key,
            block,
        },
    )
    .put_intent(&Intent {
        id: j.next_intent_id(),
        op: IntentOp::AcquireBlock {
            pool: "default".into(),
            block: Some(block),
        },
        state: IntentState::Done,
        created_unix: 1,
    });
    j.commit(b).expect("commit");
    // Crash-like close: dump/verify must replay the WAL.
    j.abandon();
}

#[test]
fn journal_dump_and_verify_on_a_healthy_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_journal(dir.path());
    let d = dir.path().to_str().expect("utf-8");

    let o = run(COILCTL, &["journal", "dump", "--dir", d, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["node"]["node_name"], "node-1");
    assert_eq!(v["leases"][0]["block"], "10.0.1.0/28");
    assert_eq!(v["leases"][0]["epoch"], 3);
    assert_eq!(v["attachments"][0]["addresses"][0]["address"], "10.0.1.3");
    assert_eq!(v["addresses"][0]["container_id"], "c0ffee");
    assert_eq!(
        v["intents"][0]["op"],
        "acquire-block pool=default block=10.0.1.0/28"
    );
    assert_eq!(v["corrupt"].as_array().map(Vec::len), Some(0));

    let o = run(COILCTL, &["journal", "dump", "--dir", d]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("LEASES (1)") && text.contains("10.0.1.0/28"),
        "{text}"
    );
    assert!(text.contains("default/p"), "{text}");

    let o = run(COILCTL, &["journal", "verify", "--dir", d]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok: every record is intact"));
    let o = run(COILCTL, &["journal", "verify", "--dir", d, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["ok"], true);
    assert_eq!(v["records"], 5);
}

#[test]
fn journal_verify_names_the_corrupt_record_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_journal(dir.path());
    // Open and close cleanly so the state is checkpointed into sled, then
    // damage a stored value behind the journal's back.
    Journal::open(dir.path())
        .expect("open")
        .close()
        .expect("close");
    {
        let db = sled::open(dir.path().join("sled")).expect("sled");
        let t = db.open_tree("leases").expect("tree");
        let (k, v) = t.iter().next().expect("lease").expect("read");
        let mut v = v.to_vec();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        t.insert(k, v).expect("insert");
        db.flush().expect("flush");
    }
    let d = dir.path().to_str().expect("utf-8");
    let o = run(COILCTL, &["journal", "verify", "--dir", d]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("CORRUPT leases/10.0.1.0/28"), "{text}");
    // The address whose block record is unreadable is also flagged.
    assert!(text.contains("INCONSISTENT address 10.0.1.3"), "{text}");
    let o = run(COILCTL, &["journal", "verify", "--dir", d, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["corrupt"][0]["key"], "leases/10.0.1.0/28");
    let o = run(COILCTL, &["journal", "dump", "--dir", d]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn journal_tools_refuse_missing_and_busy_journals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("none");
    let m = missing.to_str().expect("utf-8");
    let o = run(COILCTL, &["journal", "verify", "--dir", m]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no journal"));
    assert!(!missing.exists());

    let j = Journal::open(dir.path().join("busy")).expect("open");
    let b = dir.path().join("busy");
    let o = run(
        COILCTL,
        &["journal", "dump", "--dir", b.to_str().expect("utf-8")],
    );
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("is coild running"));
    drop(j);

    let o = run(COILCTL, &["journal", "dump", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
}
