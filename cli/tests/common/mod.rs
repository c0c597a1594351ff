//! A node for tests: coild (the real binary) running in a fresh network
//! namespace, pods as network namespaces, and the real `coil` plugin called
//! with CNI environment and netconf, as a runtime would. Everything is
//! created under unique names and removed on drop. Needs root.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const COIL: &str = env!("CARGO_BIN_EXE_coil");
pub const COILD: &str = env!("CARGO_BIN_EXE_coild");
pub const COILCTL: &str = env!("CARGO_BIN_EXE_coilctl");

static N: AtomicU32 = AtomicU32::new(0);

pub fn unique(tag: &str) -> String {
    // netns names: short, unique per process and call.
    format!(
        "ct{}{}{}",
        std::process::id() % 100_000,
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command")
}

pub fn ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(o.status.success(), "{args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Which store the node's coild uses.
pub enum StoreMode {
    Embedded,
    Etcd { endpoint: String, prefix: String },
}

pub struct Node {
    pub name: String,
    pub netns: String,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub mode: StoreMode,
    coild: Option<Child>,
    etcd: Option<Child>,
    pods: Vec<String>,
    /// Extra coild flags (resync interval, min blocks...).
    pub extra: Vec<String>,
    /// The coild binary to run (a failpoint build for some tests).
    pub coild_bin: String,
    /// Extra environment for coild.
    pub env: Vec<(String, String)>,
    /// coild's state directory (default: the node's temp dir), e.g. on a
    /// power-cut filesystem.
    pub state_dir: Option<PathBuf>,
    /// TLS client material for etcd: coild gets it as COILD_ETCD_TLS_*
    /// (as deploy/kubernetes/coil.yaml sets it), coilctl as flags.
    pub etcd_tls: Option<EtcdTls>,
}

/// PEM files of an etcd TLS client.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Node {
    /// A node netns with forwarding on (both families), and (for the embedded store) the
    /// pools created before coild starts.
    pub fn new(mode: StoreMode, pools: &[&[&str]]) -> Node {
        Node::new_with(mode, pools, |_| {})
    }

    /// Like [`Node::new`], with `setup` run once the node's netns exists,
    /// before the pools are created and coild starts (to attach the netns
    /// to a network, set TLS material...).
    pub fn new_with(mode: StoreMode, pools: &[&[&str]], setup: impl FnOnce(&mut Node)) -> Node {
        let netns = unique("n");
        ok(&["ip", "netns", "add", &netns]);
        ok(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        ok(&[
            "ip",
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("coild.sock");
        let mut n = Node {
            name: format!("node-{netns}"),
            netns,
            socket,
            dir,
            mode,
            coild: None,
            etcd: None,
            pods: Vec::new(),
            extra: Vec::new(),
            coild_bin: COILD.to_string(),
            env: Vec::new(),
            state_dir: None,
            etcd_tls: None,
        };
        setup(&mut n);
        n.set_boot_id("boot-1");
        if let StoreMode::Etcd { endpoint, .. } = &mut n.mode {
            if endpoint.is_empty() {
                *endpoint = "http://127.0.0.1:2379".into();
                n.etcd = Some(start_etcd_in(&n.netns, n.dir.path()));
            }
        }
        for p in pools {
            let o = n.coilctl(p);
            assert!(o.status.success(), "pool {p:?}: {o:?}");
        }
        n.start();
        n
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.state().join("journal")
    }

    fn state(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().to_path_buf())
    }

    /// Runs coilctl inside the node's netns (where its etcd is).
    pub fn coilctl(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, COILCTL]);
        c.env_clear().env("HOME", self.dir.path());
        match &self.mode {
            StoreMode::Embedded => {
                c.args(["--store", "embedded", "--journal-dir"])
                    .arg(self.journal_dir())
                    .arg("--socket")
                    .arg(&self.socket);
            }
            StoreMode::Etcd { endpoint, prefix } => {
                c.args(["--etcd-endpoints", endpoint, "--etcd-prefix", prefix]);
                if let Some(t) = &self.etcd_tls {
                    c.arg("--etcd-tls-ca")
                        .arg(&t.ca)
                        .arg("--etcd-tls-cert")
                        .arg(&t.cert)
                        .arg("--etcd-tls-key")
                        .arg(&t.key);
                }
            }
        }
        c.args(args).output().expect("run coilctl")
    }

    /// The boot id coild reads (tests simulate a reboot by changing it).
    pub fn set_boot_id(&self, id: &str) {
        std::fs::write(self.dir.path().join("boot_id"), format!("{id}\n")).expect("boot id");
    }

    pub fn start(&mut self) {
        // A killed coild leaves its socket file behind; readiness is the
        // new coild binding it (after its startup recovery).
        let _ = std::fs::remove_file(&self.socket);
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, &self.coild_bin])
            .args(["--node-name", &self.name])
            .arg("--boot-id-file")
            .arg(self.dir.path().join("boot_id"))
            .args(&self.extra)
            .arg("--state-dir")
            .arg(self.state())
            .arg("--socket")
            .arg(&self.socket)
            .args(["--liveness-ttl", "5s"]);
        match &self.mode {
            StoreMode::Embedded => {
                c.args(["--store", "embedded"]);
            }
            StoreMode::Etcd { endpoint, prefix } => {
                c.args([
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    endpoint,
                    "--etcd-prefix",
                    prefix,
                    "--etcd-timeout",
                    "1s",
                ]);
                if let Some(t) = &self.etcd_tls {
                    c.env("COILD_ETCD_TLS_CA", &t.ca)
                        .env("COILD_ETCD_TLS_CERT", &t.cert)
                        .env("COILD_ETCD_TLS_KEY", &t.key);
                }
            }
        }
        let log = std::fs::File::create(self.dir.path().join("coild.log")).expect("log");
        c.env("COIL_LOG", "info").stdout(Stdio::null()).stderr(log);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        self.coild = Some(c.spawn().expect("start coild"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Some(ch) = self.coild.as_mut() {
                if let Ok(Some(st)) = ch.try_wait() {
                    panic!("coild exited {st}: {}", self.log());
                }
            }
            assert!(Instant::now() < deadline, "coild not ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `secs` for coild to exit by itself; its exit status.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(c) = self.coild.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.coild = None;
                    return Some(st);
                }
            } else {
                return None;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coild.log")).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.coild.take() {
            // `ip netns exec` execs coild, so this is coild's pid.
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts coild with extra flags (replacing earlier ones).
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.stop();
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.start();
    }

    /// Stops the node's private etcd (kill -9; its data dir stays).
    pub fn etcd_stop(&mut self) {
        if let Some(mut e) = self.etcd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
    }

    /// Starts the node's private etcd again on its old data dir.
    pub fn etcd_start(&mut self) {
        if self.etcd.is_none() {
            self.etcd = Some(start_etcd_in(&self.netns, self.dir.path()));
        }
    }

    /// coild's counters.
    pub fn stats(&self) -> Value {
        use std::io::Read;
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) else {
            return Value::Null;
        };
        let _ = s.write_all(br#"{"stats":{}}"#);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    /// Waits (bounded) until `f` holds.
    pub fn wait_for(&self, what: &str, secs: u64, mut f: impl FnMut(&Node) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal (STOP, CONT, ...) to coild.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.coild {
            ok(&["kill", &format!("-{sig}"), &c.id().to_string()]);
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.coild.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new pod netns (removed on drop).
    pub fn pod(&mut self) -> String {
        let p = unique("p");
        ok(&["ip", "netns", "add", &p]);
        ok(&["ip", "-n", &p, "link", "set", "lo", "up"]);
        self.pods.push(p.clone());
        p
    }

    pub fn conf(&self, version: &str) -> String {
        format!(
            r#"{{"cniVersion":"{version}","name":"k8s-pod-network","type":"coil","socket":"{}"}}"#,
            self.socket.display()
        )
    }

    /// Links of the node netns whose name starts with "coil".
    pub fn coil_links(&self) -> Vec<String> {
        ok(&["ip", "-n", &self.netns, "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .filter(|s| s.starts_with("coil"))
            .collect()
    }

    /// Waits (bounded) until no coil host veth is left: DEL finishes the
    /// kernel teardown in the background.
    pub fn wait_links(&self, want: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = self.coil_links();
            if l.len() == want || Instant::now() > deadline {
                return l;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn table119(&self) -> String {
        ok(&["ip", "-n", &self.netns, "route", "show", "table", "119"])
    }
}

/// Starts a private etcd inside `netns`. The child is returned and reaped
/// by `Node`'s drop.
fn start_etcd_in(netns: &str, dir: &std::path::Path) -> Child {
    coil_testkit::start_etcd_in_netns(netns, dir, None).expect("etcd")
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut e) = self.etcd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
        for p in &self.pods {
            let _ = sh(&["ip", "netns", "del", p]);
        }
        let _ = sh(&["ip", "netns", "del", &self.netns]);
    }
}

/// The result of one plugin call.
#[derive(Debug)]
pub struct Cni {
    pub code: i32,
    pub out: Value,
    pub raw: String,
    pub stderr: String,
}

impl Cni {
    /// The CNI error code, if the call failed with one.
    pub fn err(&self) -> Option<u64> {
        if self.code == 0 {
            None
        } else {
            self.out.get("code").and_then(Value::as_u64)
        }
    }

    pub fn ip(&self) -> String {
        self.out["ips"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Every address of the answer, in order, without prefix lengths.
    pub fn ips(&self) -> Vec<String> {
        self.out["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["address"].as_str())
                    .map(|s| s.split('/').next().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Overwrites the journal's WAL segments in `dir` with garbage (a lost or
/// destroyed journal).
pub fn destroy_journal(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir.join("wal")).expect("wal") {
        let p = e.expect("entry").path();
        std::fs::write(&p, b"garbage garbage garbage garbage garbage").expect("corrupt");
    }
}

/// Calls the plugin. `env` entries with an empty value are left unset.
pub fn cni(env: &[(&str, &str)], stdin: &[u8]) -> Cni {
    let mut c = Command::new(COIL);
    c.env_clear();
    for (k, v) in env {
        if !v.is_empty() {
            c.env(k, v);
        }
    }
    let mut ch = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run coil");
    if let Some(mut i) = ch.stdin.take() {
        let _ = i.write_all(stdin);
    }
    let o = ch.wait_with_output().expect("coil");
    let raw = String::from_utf8_lossy(&o.stdout).into_owned();
    Cni {
        code: o.status.code().unwrap_or(-1),
        out: if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).unwrap_or(Value::String(raw.clone()))
        },
        raw,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

impl Node {
    /// ADD/DEL/CHECK for a pod netns (by name), container id and ifname.
    pub fn call(
        &self,
        cmd: &str,
        version: &str,
        pod: &str,
        cid: &str,
        ifname: &str,
        args: &str,
    ) -> Cni {
        let netns = if pod.is_empty() {
            String::new()
        } else {
            format!("/run/netns/{pod}")
        };
        cni(
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", ifname),
                ("CNI_ARGS", args),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            self.conf(version).as_bytes(),
        )
    }

    pub fn add(&self, pod: &str, cid: &str) -> Cni {
        self.call("ADD", "1.0.0", pod, cid, "eth0", "")
    }

    pub fn del(&self, pod: &str, cid: &str) -> Cni {
        self.call("DEL", "1.0.0", pod, cid, "eth0", "")
    }
}

/// Can `from` (a netns) ping `to`?
pub fn ping(from: &str, to: &str) -> bool {
    sh(&["ip", "netns", "exec", from, "ping", "-c1", "-W2", to])
        .status
        .success()
}

/// A process a test started (killed and reaped on drop).
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `args` inside the netns `ns`, stderr to `log`.
pub fn spawn_in(ns: &str, args: &[&str], log: &std::path::Path) -> Proc {
    let log = std::fs::File::create(log).expect("log");
    let c = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .env("COIL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    Proc(Some(c))
}

/// Waits (bounded) until `f` holds.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A store on the tests' shared etcd under `prefix`, and that etcd's
/// endpoint.
pub async fn shared_store(
    prefix: &str,
) -> (coil::store::Store<coil_adapters::etcd::EtcdBackend>, String) {
    let ep = coil_testkit::shared_etcd().expect("etcd");
    let b = coil_adapters::etcd::EtcdBackend::connect(&coil_adapters::etcd::EtcdOptions {
        endpoints: vec![ep.clone()],
        ..Default::default()
    })
    .await
    .expect("connect");
    (coil::store::Store::open(b, prefix).await.expect("open"), ep)
}

/// A node's liveness record, as coild registers it.
pub fn node_record(n: &str) -> coil::store::NodeRecord {
    coil::store::NodeRecord {
        node: n.into(),
        boot_id: "b".into(),
        started_unix: 0,
        version: "t".into(),
    }
}
