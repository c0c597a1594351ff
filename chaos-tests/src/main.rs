//! coil's chaos harness (run it through `chaos-tests/run`).
//!
//! On this machine, as root: a node network namespace with etcd and coild
//! (built with failpoints), pods as network namespaces, ADD/DEL storms
//! through the real `coil` binary from concurrent callers, while coild is
//! SIGKILLed at random moments and at every failpoint, etcd is killed and
//! restarted, reboots are simulated (every pod netns and coil's kernel
//! state wiped, new boot id) and the journal is corrupted and rebuilt with
//! `coilctl node repair --rebuild`. After a final convergence it checks the
//! invariants of "nothing lost, nothing doubled" and prints a summary
//! ending with a machine-readable line. Exit 1 on any violation.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Every failpoint coild has, cycled through by the kills.
use coil::failpoint::ALL as FAILPOINTS;

mod cluster;

struct Args {
    duration: Duration,
    seed: u64,
    bin_dir: PathBuf,
    workers: usize,
    /// --workers was given (the cluster mode's default differs).
    workers_given: bool,
    summary: Option<PathBuf>,
    /// The multi-node mode (cluster.rs).
    cluster: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        duration: Duration::from_secs(150),
        seed: rand::thread_rng().gen(),
        bin_dir: PathBuf::from("target/chaos/debug"),
        workers: 3,
        workers_given: false,
        summary: None,
        cluster: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match x.as_str() {
            "--short" => a.duration = Duration::from_secs(150),
            "--long" => a.duration = Duration::from_secs(1800),
            "--duration" => {
                a.duration = Duration::from_secs(
                    val("--duration")?
                        .parse()
                        .map_err(|_| "--duration SECONDS")?,
                )
            }
            "--seed" => a.seed = val("--seed")?.parse().map_err(|_| "--seed N")?,
            "--bin-dir" => a.bin_dir = PathBuf::from(val("--bin-dir")?),
            "--workers" => {
                a.workers = val("--workers")?.parse().map_err(|_| "--workers N")?;
                a.workers_given = true;
            }
            "--cluster" => a.cluster = true,
            "--summary" => a.summary = Some(PathBuf::from(val("--summary")?)),
            "-h" | "--help" => {
                println!(
                    "chaos-tests/run [--cluster] [--short|--long] [--seed N] [--duration SECS] [--workers N]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn sh_ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(o.status.success(), "{args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The node: its netns, etcd, coild and the binaries.
struct Node {
    ns: String,
    dir: PathBuf,
    bins: PathBuf,
    socket: PathBuf,
    etcd: Mutex<Option<Child>>,
    coild: Mutex<Option<Child>>,
    boot: AtomicU64,
}

impl Node {
    fn bin(&self, name: &str) -> String {
        self.bins.join(name).display().to_string()
    }

    fn in_ns(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.ns];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn start_etcd(&self) {
        let mut g = self.etcd.lock().expect("etcd");
        if g.is_some() {
            return;
        }
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("log");
        let c = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "etcd",
                "--name",
                "c",
                "--data-dir",
            ])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "c=http://127.0.0.1:2380",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd");
        *g = Some(c);
        drop(g);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .in_ns(&["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/2379"])
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_etcd(&self) {
        if let Some(mut c) = self.etcd.lock().expect("etcd").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn set_boot(&self, n: u64) {
        self.boot.store(n, Ordering::SeqCst);
        std::fs::write(self.dir.join("boot_id"), format!("chaos-boot-{n}\n")).expect("boot id");
    }

    /// Starts coild; Err when it exits before serving (e.g. it refused a
    /// corrupt journal).
    fn start_coild(&self, failpoint: Option<&str>) -> Result<(), String> {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("coild.log"))
            .expect("log");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, &self.bin("coild")])
            .args([
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "--etcd-timeout",
                "1s",
                "--node-name",
                "chaos-node",
                "--resync-interval",
                "1s",
                "--min-blocks",
                "1",
                "--liveness-ttl",
                "5s",
            ])
            .arg("--state-dir")
            .arg(&self.dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--boot-id-file")
            .arg(self.dir.join("boot_id"))
            .env("COIL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(fp) = failpoint {
            c.env("COIL_FAILPOINTS", fp);
        }
        let mut child = c.spawn().map_err(|e| format!("spawn coild: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket.exists() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("coild exited at start: {st}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("coild did not become ready".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        *self.coild.lock().expect("coild") = Some(child);
        Ok(())
    }

    fn kill_coild(&self) {
        if let Some(mut c) = self.coild.lock().expect("coild").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Some(signal) when coild died on its own (a failpoint aborts).
    fn reap(&self) -> Option<Option<i32>> {
        use std::os::unix::process::ExitStatusExt;
        let mut g = self.coild.lock().expect("coild");
        let st = g.as_mut()?.try_wait().ok().flatten()?;
        *g = None;
        Some(st.signal())
    }

    fn coilctl(&self, args: &[&str]) -> Output {
        let ctl = self.bin("coilctl");
        let jdir = self.dir.join("journal").display().to_string();
        let sock = self.socket.display().to_string();
        let mut v = vec![
            ctl.as_str(),
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--journal-dir",
            &jdir,
            "--socket",
            &sock,
        ];
        v.extend_from_slice(args);
        self.in_ns(&v)
    }

    fn stats(&self) -> Value {
        use std::io::Read;
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) else {
            return Value::Null;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.write_all(br#"{"stats":{}}"#);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    fn coil_links(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.in_ns(&["ip", "-o", "link", "show"]).stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .filter(|s| s.starts_with("coil"))
            .collect()
    }

    /// The blocks published in table 119, both families.
    fn table119(&self) -> BTreeSet<String> {
        ["-4", "-6"]
            .iter()
            .flat_map(|f| {
                String::from_utf8_lossy(
                    &self
                        .in_ns(&["ip", f, "route", "show", "table", "119"])
                        .stdout,
                )
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// A CNI call's outcome.
struct Res {
    code: i32,
    out: Value,
}

fn cni(node: &Node, cmd: &str, cid: &str, netns: Option<&str>) -> Res {
    call_plugin(&node.bin("coil"), &node.socket, cmd, cid, netns)
}

/// Calls the `coil` plugin at `bin` as a runtime would, for the coild at
/// `socket`; never panics (a failure to run it is a result too).
fn call_plugin(
    bin: &str,
    socket: &std::path::Path,
    cmd: &str,
    cid: &str,
    netns: Option<&str>,
) -> Res {
    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"chaos","type":"coil","socket":"{}"}}"#,
        socket.display()
    );
    let mut c = Command::new(bin);
    c.env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}"),
        );
    if let Some(ns) = netns {
        c.env("CNI_NETNS", format!("/run/netns/{ns}"));
    }
    let spawned = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut ch = match spawned {
        Ok(ch) => ch,
        Err(e) => {
            return Res {
                code: -1,
                out: Value::String(format!("spawn coil: {e}")),
            }
        }
    };
    if let Some(mut i) = ch.stdin.take() {
        let _ = i.write_all(conf.as_bytes());
    }
    let o = match ch.wait_with_output() {
        Ok(o) => o,
        Err(e) => {
            return Res {
                code: -1,
                out: Value::String(format!("wait coil: {e}")),
            }
        }
    };
    let raw = String::from_utf8_lossy(&o.stdout);
    Res {
        code: o.status.code().unwrap_or(-1),
        out: if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).unwrap_or(Value::String(raw.to_string()))
        },
    }
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    add_ok: AtomicU64,
    add_err: AtomicU64,
    del_ok: AtomicU64,
    del_err: AtomicU64,
    retryable: AtomicU64,
    kills: AtomicU64,
    failpoint_kills: AtomicU64,
    etcd_restarts: AtomicU64,
    reboots: AtomicU64,
    corruptions: AtomicU64,
    rebuilds: AtomicU64,
}

/// What the callers believe.
#[derive(Default)]
struct Model {
    /// ADD answered success, not deleted since: cid -> (netns, address).
    /// Live pods: netns and the addresses ADD answered (one per family).
    live: BTreeMap<String, (String, Vec<IpAddr>)>,
    /// Must be DELeted (failed ADD, or chosen), with its netns if it still
    /// exists.
    to_del: Vec<(String, Option<String>)>,
    violations: Vec<String>,
    next: u64,
}

struct Shared {
    node: Node,
    model: Mutex<Model>,
    c: Counters,
    paused: AtomicBool,
    stop: AtomicBool,
    inflight: AtomicUsize,
}

impl Shared {
    fn violation(&self, v: String) {
        eprintln!("VIOLATION: {v}");
        self.model.lock().expect("model").violations.push(v);
    }

    /// A failed call must carry a CNI error object.
    fn check_error(&self, what: &str, r: &Res) {
        match r.out.get("code").and_then(Value::as_u64) {
            Some(11) => {
                self.c.retryable.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
            None => self.violation(format!(
                "{what} failed (exit {}) without a CNI error: {}",
                r.code, r.out
            )),
        }
    }
}

fn worker(sh: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        sh.inflight.fetch_add(1, Ordering::SeqCst);
        if sh.paused.load(Ordering::SeqCst) {
            sh.inflight.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let ok = one_op(&sh, &mut rng);
        sh.inflight.fetch_sub(1, Ordering::SeqCst);
        if !ok {
            // A runtime backs off after an error (code 11 says: later).
            std::thread::sleep(Duration::from_millis(rng.gen_range(20..80)));
        }
    }
}

/// One caller operation; false when the call failed.
fn one_op(sh: &Shared, rng: &mut StdRng) -> bool {
    let node = &sh.node;
    let (live_n, pending) = {
        let m = sh.model.lock().expect("model");
        (m.live.len(), m.to_del.len())
    };
    sh.c.ops.fetch_add(1, Ordering::Relaxed);
    if pending > 0 && rng.gen_bool(0.5) {
        let item = {
            let mut m = sh.model.lock().expect("model");
            if m.to_del.is_empty() {
                return true;
            }
            let i = rng.gen_range(0..m.to_del.len());
            m.to_del.swap_remove(i)
        };
        let r = cni(node, "DEL", &item.0, item.1.as_deref());
        if r.code == 0 {
            sh.c.del_ok.fetch_add(1, Ordering::Relaxed);
            if let Some(ns) = &item.1 {
                let _ = sh_quiet(&["ip", "netns", "del", ns]);
            }
            return true;
        }
        sh.c.del_err.fetch_add(1, Ordering::Relaxed);
        sh.check_error("DEL", &r);
        sh.model.lock().expect("model").to_del.push(item);
        return false;
    }
    if live_n < 24 || rng.gen_bool(0.45) {
        let cid = {
            let mut m = sh.model.lock().expect("model");
            m.next += 1;
            format!("chaos{:06}", m.next)
        };
        let ns = format!("cx{}", &cid[5..]);
        if !sh_quiet(&["ip", "netns", "add", &ns]) {
            return false;
        }
        let r = cni(node, "ADD", &cid, Some(&ns));
        let ips: Vec<IpAddr> = r.out["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["address"].as_str())
                    .filter_map(|a| a.split('/').next()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        match r.code {
            0 => {
                sh.c.add_ok.fetch_add(1, Ordering::Relaxed);
                // The pool is dual-stack: one address of each family.
                let v4 = ips.iter().filter(|a| a.is_ipv4()).count();
                let v6 = ips.iter().filter(|a| a.is_ipv6()).count();
                if (v4, v6) != (1, 1) {
                    sh.violation(format!(
                        "ADD of {cid} answered {ips:?}, not one IPv4 and one IPv6 address"
                    ));
                }
                let mut m = sh.model.lock().expect("model");
                for ip in &ips {
                    if let Some((other, _)) = m.live.iter().find(|(_, (_, a))| a.contains(ip)) {
                        let v = format!("ADD of {cid} answered {ip}, which {other} still holds");
                        drop(m);
                        sh.violation(v);
                        m = sh.model.lock().expect("model");
                    }
                }
                m.live.insert(cid, (ns, ips));
                true
            }
            _ => {
                sh.c.add_err.fetch_add(1, Ordering::Relaxed);
                sh.check_error("ADD", &r);
                // The runtime DELs after a failed ADD.
                sh.model.lock().expect("model").to_del.push((cid, Some(ns)));
                false
            }
        }
    } else {
        let item = {
            let mut m = sh.model.lock().expect("model");
            if m.live.is_empty() {
                return true;
            }
            let i = rng.gen_range(0..m.live.len());
            let k = m.live.keys().nth(i).cloned();
            k.and_then(|k| m.live.remove(&k).map(|v| (k, v)))
        };
        if let Some((cid, (ns, _))) = item {
            sh.model.lock().expect("model").to_del.push((cid, Some(ns)));
        }
        true
    }
}

fn sh_quiet(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Holds the callers off and waits for the calls in flight.
fn pause(sh: &Shared) {
    sh.paused.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(120);
    while sh.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ensure_coild(sh: &Shared) {
    for attempt in 0..5 {
        if sh.node.coild.lock().expect("coild").is_some() {
            return;
        }
        match sh.node.start_coild(None) {
            Ok(()) => return,
            Err(e) => {
                // A journal coild refuses: rebuild it from etcd and the kernel.
                eprintln!(
                    "coild would not start ({e}); rebuilding its journal (attempt {attempt})"
                );
                sh.node.start_etcd();
                let boot = sh.node.dir.join("boot_id").display().to_string();
                let o = sh.node.coilctl(&[
                    "node",
                    "repair",
                    "chaos-node",
                    "--rebuild",
                    "--boot-id-file",
                    &boot,
                ]);
                sh.c.rebuilds.fetch_add(1, Ordering::Relaxed);
                if !o.status.success() {
                    sh.violation(format!(
                        "node repair --rebuild failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    ));
                }
            }
        }
    }
    sh.violation("coild could not be started again".into());
}

fn reboot(sh: &Shared) {
    pause(sh);
    sh.node.kill_coild();
    {
        let mut m = sh.model.lock().expect("model");
        let live: Vec<(String, (String, Vec<IpAddr>))> =
            std::mem::take(&mut m.live).into_iter().collect();
        for (cid, (ns, _)) in live {
            let _ = sh_quiet(&["ip", "netns", "del", &ns]);
            // The runtime cleans the dead sandbox up: a DEL without netns.
            m.to_del.push((cid, None));
        }
        for item in m.to_del.iter_mut() {
            if let Some(ns) = item.1.take() {
                let _ = sh_quiet(&["ip", "netns", "del", &ns]);
            }
        }
    }
    for l in sh.node.coil_links() {
        let _ = sh.node.in_ns(&["ip", "link", "del", &l]);
    }
    let _ = sh.node.in_ns(&["ip", "route", "flush", "table", "119"]);
    let _ = sh.node.in_ns(&["ip", "route", "flush", "proto", "30"]);
    sh.node.set_boot(sh.node.boot.load(Ordering::SeqCst) + 1);
    sh.c.reboots.fetch_add(1, Ordering::Relaxed);
    ensure_coild(sh);
    sh.paused.store(false, Ordering::SeqCst);
}

fn corrupt(sh: &Shared, rng: &mut StdRng) {
    pause(sh);
    sh.node.kill_coild();
    // Damage the journal detectably (a silently truncated log of
    // acknowledged writes is not a failure a disk produces, and nothing
    // could detect it): either it is lost entirely, or its checkpoint
    // marker is garbage. coild must refuse both; the journal is then
    // rebuilt from etcd and the kernel.
    let jdir = sh.node.dir.join("journal");
    if rng.gen_bool(0.5) {
        let _ = std::fs::remove_dir_all(&jdir);
    } else {
        let _ = std::fs::write(jdir.join("CHECKPOINT"), b"this is not a checkpoint");
    }
    sh.c.corruptions.fetch_add(1, Ordering::Relaxed);
    ensure_coild(sh);
    sh.paused.store(false, Ordering::SeqCst);
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chaos: {e}");
            std::process::exit(2);
        }
    };
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("chaos: run as root (network namespaces)");
        std::process::exit(2);
    }
    if args.cluster {
        std::process::exit(cluster::main(&args));
    }
    let dir = tempfile::Builder::new()
        .prefix("coil-chaos-")
        .tempdir()
        .expect("tempdir");
    let ns = format!("chaosnode{}", std::process::id() % 10000);
    let _ = sh_quiet(&["ip", "netns", "del", &ns]);
    sh_ok(&["ip", "netns", "add", &ns]);
    sh_ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    let node = Node {
        ns: ns.clone(),
        dir: dir.path().to_path_buf(),
        bins: std::fs::canonicalize(&args.bin_dir).expect("bin dir"),
        socket: dir.path().join("coild.sock"),
        etcd: Mutex::new(None),
        coild: Mutex::new(None),
        boot: AtomicU64::new(1),
    };
    node.set_boot(1);
    node.start_etcd();
    let o = node.coilctl(&[
        "pool",
        "create",
        "default",
        "10.60.0.0/22",
        "--ipv6",
        "fd00:60::/118",
        "--block-size",
        "3",
    ]);
    assert!(o.status.success(), "pool create: {o:?}");
    node.start_coild(None).expect("coild");
    println!(
        "chaos: seed {} for {:?} with {} callers (node netns {ns}, dir {})",
        args.seed,
        args.duration,
        args.workers,
        dir.path().display()
    );
    let sh = Arc::new(Shared {
        node,
        model: Mutex::new(Model::default()),
        c: Counters::default(),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        inflight: AtomicUsize::new(0),
    });
    let workers: Vec<_> = (0..args.workers)
        .map(|i| {
            let s = sh.clone();
            let seed = args.seed.wrapping_add(i as u64 + 1);
            std::thread::spawn(move || worker(s, seed))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let start = Instant::now();
    let mut k: usize = 0;
    let mut last_report = Instant::now();
    // Faults stop for the last 15% of the run: the callers go on, so pods
    // added in calm conditions are checked too, next to chaos survivors.
    let chaos_until = args.duration.mul_f64(0.85);
    let mut calm = false;
    while start.elapsed() < args.duration {
        std::thread::sleep(Duration::from_millis(rng.gen_range(80..700)));
        if start.elapsed() > chaos_until {
            if !calm {
                // The last restart may have armed a failpoint: the calm
                // tail starts with a coild that has none.
                calm = true;
                if sh.node.reap() == Some(Some(libc::SIGABRT)) {
                    sh.c.failpoint_kills.fetch_add(1, Ordering::Relaxed);
                    sh.c.kills.fetch_add(1, Ordering::Relaxed);
                }
                sh.node.kill_coild();
                ensure_coild(&sh);
                continue;
            }
            if let Some(sig) = sh.node.reap() {
                sh.violation(format!("coild died in the calm tail (signal {sig:?})"));
                ensure_coild(&sh);
            }
            continue;
        }
        // A failpoint may have killed coild: count it and restart.
        if let Some(sig) = sh.node.reap() {
            if sig == Some(libc::SIGABRT) {
                sh.c.failpoint_kills.fetch_add(1, Ordering::Relaxed);
                sh.c.kills.fetch_add(1, Ordering::Relaxed);
            } else {
                sh.violation(format!(
                    "coild died on its own (signal {sig:?}); see its log"
                ));
            }
            ensure_coild(&sh);
        }
        let dice: f64 = rng.gen();
        if dice < 0.75 {
            // SIGKILL at a random moment, then restart, half the time with
            // the next failpoint armed.
            sh.node.kill_coild();
            sh.c.kills.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
            let fp = rng.gen_bool(0.5).then(|| {
                k += 1;
                FAILPOINTS[k % FAILPOINTS.len()]
            });
            if sh.node.start_coild(fp).is_err() {
                ensure_coild(&sh);
            }
        } else if dice < 0.84 {
            sh.node.kill_etcd();
            sh.c.etcd_restarts.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(rng.gen_range(500..2500)));
            sh.node.start_etcd();
        } else if dice < 0.91 {
            reboot(&sh);
        } else if dice < 0.96 {
            corrupt(&sh, &mut rng);
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            last_report = Instant::now();
            println!(
                "  {:>4}s ops {} kills {} (failpoints {}) etcd restarts {} reboots {} corruptions {}",
                start.elapsed().as_secs(),
                sh.c.ops.load(Ordering::Relaxed),
                sh.c.kills.load(Ordering::Relaxed),
                sh.c.failpoint_kills.load(Ordering::Relaxed),
                sh.c.etcd_restarts.load(Ordering::Relaxed),
                sh.c.reboots.load(Ordering::Relaxed),
                sh.c.corruptions.load(Ordering::Relaxed),
            );
        }
    }
    // ---- convergence
    sh.stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    sh.node.start_etcd();
    if sh.node.reap().is_some() || sh.node.coild.lock().expect("coild").is_none() {
        ensure_coild(&sh);
    }
    // Restart without any failpoint armed.
    sh.node.kill_coild();
    ensure_coild(&sh);
    converge(&sh);
    let report = finish(&sh, &args, start.elapsed());
    sh.node.kill_coild();
    sh.node.kill_etcd();
    for n in sh_ok(&["ip", "netns", "list"]).lines() {
        let name = n.split_whitespace().next().unwrap_or("");
        if name.starts_with("cx") {
            let _ = sh_quiet(&["ip", "netns", "del", name]);
        }
    }
    let _ = sh_quiet(&["ip", "netns", "del", &ns]);
    // process::exit runs no destructors: remove the run's directory (some
    // 130 MB of etcd data and journals) here, or keep it, named, when the
    // run failed, as the cluster mode does.
    if report == 0 {
        drop(dir);
    } else {
        let kept = dir.keep();
        let _ = std::fs::remove_dir_all(kept.join("etcd"));
        println!("  logs and journal kept in {}", kept.display());
    }
    std::process::exit(report);
}

/// Drains the DEL backlog (as runtimes would), repairs, then checks the
/// invariants with the surviving pods, then deletes them and checks that
/// nothing leaked.
fn converge(sh: &Shared) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let item = sh.model.lock().expect("model").to_del.pop();
        let Some(item) = item else { break };
        let r = cni(&sh.node, "DEL", &item.0, item.1.as_deref());
        if r.code == 0 {
            if let Some(ns) = &item.1 {
                let _ = sh_quiet(&["ip", "netns", "del", ns]);
            }
        } else {
            sh.check_error("DEL", &r);
            sh.model.lock().expect("model").to_del.push(item);
            if Instant::now() > deadline {
                sh.violation("DELs kept failing after the chaos ended".into());
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let o = sh.node.coilctl(&["node", "repair"]);
    if !o.status.success() {
        sh.violation(format!(
            "final node repair failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
}

fn pod_addrs(ns: &str) -> Vec<IpAddr> {
    String::from_utf8_lossy(&sh(&["ip", "-n", ns, "-o", "addr", "show", "dev", "eth0"]).stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .filter(|a: &IpAddr| !matches!(a, IpAddr::V6(v) if v.segments()[0] == 0xfe80))
        .collect()
}

fn finish(sh: &Shared, args: &Args, elapsed: Duration) -> i32 {
    let node = &sh.node;
    let live: Vec<(String, (String, Vec<IpAddr>))> = sh
        .model
        .lock()
        .expect("model")
        .live
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // 1. Every successful ADD is still wired; 2. no address twice.
    let mut seen: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (cid, (ns, ips)) in &live {
        let addrs = pod_addrs(ns);
        for ip in ips {
            if !addrs.contains(ip) {
                sh.violation(format!(
                    "{cid}: ADD answered {ip} but the pod has {addrs:?}"
                ));
            }
            let (fam, host) = if ip.is_ipv4() {
                ("-4", 32)
            } else {
                ("-6", 128)
            };
            let route = String::from_utf8_lossy(
                &node
                    .in_ns(&["ip", fam, "route", "show", &format!("{ip}/{host}")])
                    .stdout,
            )
            .to_string();
            if !route.contains("dev coil") {
                sh.violation(format!("{cid}: no host route to {ip} ({route:?})"));
            }
            if let Some(other) = seen.insert(*ip, cid.clone()) {
                sh.violation(format!("address {ip} assigned to both {other} and {cid}"));
            }
        }
    }
    // 3. Table 119 equals the node's leases in etcd.
    let leased: BTreeSet<String> = serde_json::from_slice::<Value>(
        &node
            .coilctl(&["node", "blocks", "chaos-node", "--json"])
            .stdout,
    )
    .ok()
    .and_then(|v| v.as_array().cloned())
    .unwrap_or_default()
    .iter()
    .filter_map(|b| b["block"].as_str().map(String::from))
    .collect();
    let table = node.table119();
    if leased != table {
        sh.violation(format!(
            "table 119 {table:?} differs from the leases {leased:?}"
        ));
    }
    // 4. Delete every pod: nothing may leak.
    for (cid, (ns, _)) in &live {
        let r = cni(node, "DEL", cid, Some(ns));
        if r.code != 0 {
            sh.violation(format!("final DEL of {cid} failed: {}", r.out));
        }
        let _ = sh_quiet(&["ip", "netns", "del", ns]);
    }
    sh.model.lock().expect("model").live.clear();
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let last = node.stats();
        let links = node.coil_links();
        let blocks = node.table119().len();
        // coild keeps one empty block of each family (min-blocks 1).
        if last["attachments"] == 0 && links.is_empty() && blocks <= 2 {
            break last;
        }
        if Instant::now() > deadline {
            sh.violation(format!(
                "after deleting every pod: stats {last}, links {links:?}, {blocks} block(s) in table 119 (min 1 per family)"
            ));
            break last;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for ip in seen.keys() {
        let v: Value = serde_json::from_slice(
            &node
                .coilctl(&["address", "info", &ip.to_string(), "--json"])
                .stdout,
        )
        .unwrap_or(Value::Null);
        if !v["assignment"].is_null() {
            // The index is asynchronous: give it a moment once.
            std::thread::sleep(Duration::from_secs(3));
            let v: Value = serde_json::from_slice(
                &node
                    .coilctl(&["address", "info", &ip.to_string(), "--json"])
                    .stdout,
            )
            .unwrap_or(Value::Null);
            if !v["assignment"].is_null() {
                sh.violation(format!(
                    "address index still lists {ip}: {}",
                    v["assignment"]
                ));
            }
        }
    }
    let c = &sh.c;
    let violations = sh.model.lock().expect("model").violations.clone();
    let result = json!({
        "seed": args.seed,
        "seconds": elapsed.as_secs(),
        "ops": c.ops.load(Ordering::Relaxed),
        "add_ok": c.add_ok.load(Ordering::Relaxed),
        "add_failed": c.add_err.load(Ordering::Relaxed),
        "del_ok": c.del_ok.load(Ordering::Relaxed),
        "del_failed": c.del_err.load(Ordering::Relaxed),
        "retryable_errors": c.retryable.load(Ordering::Relaxed),
        "kills": c.kills.load(Ordering::Relaxed),
        "failpoint_kills": c.failpoint_kills.load(Ordering::Relaxed),
        "etcd_restarts": c.etcd_restarts.load(Ordering::Relaxed),
        "reboots": c.reboots.load(Ordering::Relaxed),
        "corruptions": c.corruptions.load(Ordering::Relaxed),
        "rebuilds": c.rebuilds.load(Ordering::Relaxed),
        "pods_checked": seen.len(),
        "violations": violations.len(),
        "final_stats": last,
    });
    println!();
    println!("chaos summary (seed {}):", args.seed);
    for k in [
        "ops",
        "add_ok",
        "add_failed",
        "del_ok",
        "del_failed",
        "retryable_errors",
        "kills",
        "failpoint_kills",
        "etcd_restarts",
        "reboots",
        "corruptions",
        "rebuilds",
        "pods_checked",
        "violations",
    ] {
        println!("  {k:<17} {}", result[k]);
    }
    for v in &violations {
        println!("  violation: {v}");
    }
    if !violations.is_empty() {
        println!(
            "  reproduce with: chaos-tests/run --seed {} --duration {}",
            args.seed,
            args.duration.as_secs()
        );
    }
    println!("CHAOS_RESULT {result}");
    let summary = args
        .summary
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench/summary.json"));
    write_summary(
        &summary,
        &[
            (
                "chaos.kills",
                result["kills"].as_f64().unwrap_or(0.0),
                "kills",
            ),
            (
                "chaos.ops",
                result["ops"].as_f64().unwrap_or(0.0),
                "operations",
            ),
            ("chaos.violations", violations.len() as f64, "violations"),
        ],
    );
    if violations.is_empty() {
        0
    } else {
        1
    }
}

fn write_summary(path: &Path, figs: &[(&str, f64, &str)]) {
    if let Some(p) = path.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    let mut all: BTreeMap<String, Value> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (k, v, u) in figs {
        all.insert(k.to_string(), json!({"value": v, "unit": u}));
    }
    let _ = std::fs::write(
        path,
        serde_json::to_string_pretty(&all).unwrap_or_default() + "\n",
    );
}
