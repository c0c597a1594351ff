//! CNI latency and footprint: coil against Debian's ptp + host-local
//! (containernetworking-plugins), driven the same way in the same run.
//!
//! Both plugins run as fresh processes per call with CNI environment and
//! netconf on stdin, inside the same kind of node network namespace, on
//! pod namespaces created beforehand (not timed). Needs root.
//!
//! Figures (merged into `COIL_BENCH_SUMMARY`):
//! cni.add.p50_ms/p99_ms, cni.del.p50_ms/p99_ms and baseline.* (200 pods,
//! sequential); cni.add.par8.p50_ms, baseline.add.par8.p50_ms (8 callers);
//! cni.burst100.wall_ms (and baseline.burst100.wall_ms); cni.plugin.maxrss_kib
//! (and baseline.plugin.maxrss_kib); coild.rss_kib.250pods;
//! cni.add.etcd_requests (etcd mode, leased blocks with room);
//! coild.idle.etcd_requests_per_s and coild.idle.etcd_keepalives_per_s
//! (an idle coild for 30 s, counted by etcd's own gRPC metrics: unary
//! requests, and keep-alive messages on open streams);
//! cni.churn.cycle_ms, cni.churn.add.p50_ms/p99_ms, cni.churn.del.p50_ms and
//! baseline.churn.* (20 pod netns reused, ADD then DEL, 300 cycles);
//! cni.floor.add_ms (spawn of a trivial binary given the netconf + the
//! blocking wiring primitive + one fdatasync, each round in that order as
//! an ADD runs them, measured in the same run) and its parts, and
//! cni.floor.hot.* (each part in a loop of its own, for comparison).
//!
//! Knobs: COIL_BENCH_PODS (default 200), COIL_BENCH_CHURN_CYCLES (300),
//! COIL_BENCH_QUICK=1 (only sequential ADDs against the floor, three
//! alternating rounds, no summary: for work on ADD latency).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The plugin measured: `COIL_BENCH_PLUGIN` (scripts/bench sets it to the
/// statically linked build the image ships), else this build's.
static COIL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("COIL_BENCH_PLUGIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_coil").to_string())
});
const COILD: &str = env!("CARGO_BIN_EXE_coild");
const COILCTL: &str = env!("CARGO_BIN_EXE_coilctl");
const CNI_PATH: &str = "/usr/lib/cni";

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .status()
        .expect("run");
    assert!(st.success(), "{args:?}");
}

/// One plugin call: wall time and the child's peak RSS.
struct Call {
    ms: f64,
    maxrss_kib: i64,
    ok: bool,
}

/// Runs `bin` inside the netns `node` (entered in the forked child before
/// exec) with the CNI environment, and waits with wait4 for its rusage
/// (wait4 reaps the child; std's wait cannot report rusage).
#[allow(clippy::zombie_processes)]
fn call(node: &File, bin: &str, env: &[(&str, String)], stdin: &[u8]) -> Call {
    let fd = node.as_raw_fd();
    let mut c = Command::new(bin);
    c.env_clear();
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setns is async-signal-safe; the closure touches nothing else.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child: Child = c.spawn().expect("spawn plugin");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; status and ru are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    Call {
        ms,
        maxrss_kib: ru.ru_maxrss,
        ok: r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// A plugin under test: how to call it.
#[derive(Clone)]
struct Plugin {
    name: &'static str,
    bin: String,
    conf: String,
}

fn env(cmd: &str, pod: &str, with_netns: bool) -> Vec<(&'static str, String)> {
    let mut e = vec![
        ("CNI_COMMAND", cmd.to_string()),
        ("CNI_CONTAINERID", pod.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", CNI_PATH.to_string()),
        // As kubelet passes them.
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={pod}"),
        ),
    ];
    if with_netns {
        e.push(("CNI_NETNS", format!("/run/netns/{pod}")));
    }
    e
}

struct Pods {
    names: Vec<String>,
}

impl Pods {
    fn new(prefix: &str, n: usize) -> Pods {
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i:04}")).collect();
        for p in &names {
            let _ = Command::new("ip")
                .args(["netns", "del", p])
                .stderr(Stdio::null())
                .status();
            sh(&["ip", "netns", "add", p]);
        }
        Pods { names }
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for p in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", p])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sequential ADD then DEL of `n` pods; returns (add ms, del ms, max rss).
fn sequential(node: &File, pl: &Plugin, n: usize) -> (Vec<f64>, Vec<f64>, i64) {
    let pods = Pods::new(&format!("cb{}", &pl.name[..1]), n);
    let mut add = Vec::new();
    let mut del = Vec::new();
    let mut rss = 0;
    for p in &pods.names {
        let c = call(node, &pl.bin, &env("ADD", p, true), pl.conf.as_bytes());
        assert!(c.ok, "{} ADD {p} failed", pl.name);
        add.push(c.ms);
        rss = rss.max(c.maxrss_kib);
    }
    for p in &pods.names {
        let c = call(node, &pl.bin, &env("DEL", p, true), pl.conf.as_bytes());
        assert!(c.ok, "{} DEL {p} failed", pl.name);
        del.push(c.ms);
        rss = rss.max(c.maxrss_kib);
    }
    (add, del, rss)
}

/// `n` ADDs by `workers` parallel callers; returns (per-call ms, wall ms).
fn parallel(node: &File, pl: &Plugin, n: usize, workers: usize, tag: &str) -> (Vec<f64>, f64) {
    let pods = Pods::new(&format!("cq{tag}{}", &pl.name[..1]), n);
    let queue = Arc::new(Mutex::new(pods.names.clone()));
    let times = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let q = queue.clone();
            let t = times.clone();
            s.spawn(move || loop {
                let Some(p) = q.lock().expect("queue").pop() else {
                    break;
                };
                let c = call(node, &pl.bin, &env("ADD", &p, true), pl.conf.as_bytes());
                assert!(c.ok, "{} parallel ADD {p} failed", pl.name);
                t.lock().expect("times").push(c.ms);
            });
        }
    });
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    for p in &pods.names {
        let _ = call(node, &pl.bin, &env("DEL", p, true), pl.conf.as_bytes());
    }
    let t = times.lock().expect("times").clone();
    (t, wall)
}

/// Churn, as on nodes running Jobs and CI pods: `pods` network
/// namespaces reused round-robin, each cycle an ADD (a new container id)
/// then its DEL. Returns (mean cycle ms, add ms, del ms).
fn churn(node: &File, pl: &Plugin, pods: usize, cycles: usize) -> (f64, Vec<f64>, Vec<f64>) {
    let ns = Pods::new(&format!("cc{}", &pl.name[..1]), pods);
    let mut add = Vec::with_capacity(cycles);
    let mut del = Vec::with_capacity(cycles);
    let start = Instant::now();
    for i in 0..cycles {
        let p = &ns.names[i % pods];
        let cid = format!("{p}c{i}");
        let with_cid = |cmd: &str| {
            let mut e = env(cmd, p, true);
            e[1].1 = cid.clone();
            e
        };
        let c = call(node, &pl.bin, &with_cid("ADD"), pl.conf.as_bytes());
        assert!(c.ok, "{} churn ADD {cid} failed", pl.name);
        add.push(c.ms);
        let c = call(node, &pl.bin, &with_cid("DEL"), pl.conf.as_bytes());
        assert!(c.ok, "{} churn DEL {cid} failed", pl.name);
        del.push(c.ms);
    }
    let cycle = start.elapsed().as_secs_f64() * 1000.0 / cycles as f64;
    (cycle, add, del)
}

/// The parts of the floor of an ADD: p50s of a trivial binary's spawn,
/// the wiring primitive and one fdatasync (ms), and the p99 of whole
/// rounds (the floor's own tail).
#[derive(Clone, Copy)]
struct Floor {
    spawn: f64,
    wire: f64,
    fsync: f64,
    p99: f64,
}

impl Floor {
    fn add(&self) -> f64 {
        self.spawn + self.wire + self.fsync
    }
}

/// The physical floor of an ADD on this machine, measured piecewise: a
/// trivial binary spawned by the same driver and given the same netconf
/// on stdin (/bin/cat, whose output the driver discards: a CNI plugin
/// must read its netconf, and the driver, like libcni, writes it only
/// after the spawn), the wiring
/// primitive alone (veth with its peer created in the pod netns,
/// addresses, routes: the adapter's blocking primitive on the calling
/// thread, no hand-off) and one fdatasync of an appended 512-byte record.
///
/// Measured twice. `sequenced`: each round spawns, then wires, then
/// syncs, as an ADD must (a spawned process runs before every wiring, and
/// leaves the caches and the CPUs' idle states as an ADD finds them).
/// `hot`: each part in a loop of its own, back to back (the best case of
/// each part, which no ADD gets). The figure coil is held to is the
/// sequenced one; the hot one is printed next to it.
fn floor(node: &File, node_ns: &str, netconf: &[u8], n: usize) -> (Floor, Floor) {
    let pods = Pods::new("cf", 2 * n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let k = rt
        .block_on(coil_adapters::kernel::Kernel::in_netns(
            &format!("/run/netns/{node_ns}"),
            119,
            30,
        ))
        .expect("kernel");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = |i: usize| coil::kernel::WireSpec {
        netns: format!("/run/netns/{}", pods.names[i]),
        ifname: "eth0".into(),
        host_veth: format!("cfloor{i:05}"),
        alias: "coil:floor".into(),
        addresses: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            10,
            124,
            (i / 250) as u8,
            (i % 250 + 1) as u8,
        ))],
        mtu: 1500,
    };
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    // On a thread of its own: the blocking primitive enters the node's
    // netns and keeps the thread there.
    let (seq, hot) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.path().join("floor"))
                .expect("file");
            let sync = |f: &mut File| {
                let t = Instant::now();
                f.write_all(&[0u8; 512]).expect("write");
                f.sync_data().expect("fdatasync");
                ms(t)
            };
            let wire = |i: usize| {
                let sp = spec(i);
                let t = Instant::now();
                let ns = File::open(&sp.netns).expect("pod netns");
                k.wire_blocking(&sp, &ns).expect("wire");
                ms(t)
            };
            let spawn = || {
                let c = call(node, "/bin/cat", &[], netconf);
                assert!(c.ok, "/bin/cat");
                c.ms
            };
            let mut seq: [Vec<f64>; 3] = Default::default();
            for i in 0..n {
                seq[0].push(spawn());
                seq[1].push(wire(i));
                seq[2].push(sync(&mut f));
            }
            let mut hot: [Vec<f64>; 3] = Default::default();
            for _ in 0..n {
                hot[0].push(spawn());
            }
            for i in n..2 * n {
                hot[1].push(wire(i));
            }
            for _ in 0..n {
                hot[2].push(sync(&mut f));
            }
            (seq, hot)
        })
        .join()
        .expect("floor thread")
    });
    rt.block_on(async {
        for i in 0..2 * n {
            let _ = k.unwire(&format!("cfloor{i:05}")).await;
        }
    });
    drop(pods);
    // The tail is the p99 of whole rounds (spawn + wire + sync of one
    // round), not the sum of the parts' p99s, which would rarely coincide.
    let sum = |mut v: [Vec<f64>; 3]| {
        let mut rounds: Vec<f64> = (0..v[0].len())
            .map(|i| v[0][i] + v[1][i] + v[2][i])
            .collect();
        Floor {
            spawn: pct(&mut v[0], 0.5),
            wire: pct(&mut v[1], 0.5),
            fsync: pct(&mut v[2], 0.5),
            p99: pct(&mut rounds, 0.99),
        }
    };
    (sum(seq), sum(hot))
}

struct Coild {
    child: Child,
    socket: PathBuf,
    etcd: Option<Child>,
}

impl Drop for Coild {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(e) = &mut self.etcd {
            let _ = e.kill();
            let _ = e.wait();
        }
    }
}

/// The bench's single-family pool.
const SINGLE_POOL: &[&str] = &["10.128.0.0/16", "--block-size", "5"];
/// The dual-stack pool: the same IPv4 blocks, IPv6 blocks of the same size.
const DUAL_POOL: &[&str] = &[
    "10.129.0.0/16",
    "--ipv6",
    "fd00:129::/112",
    "--block-size",
    "5",
];

fn start_coild(netns: &str, dir: &Path, etcd: bool, pool: &[&str]) -> Coild {
    let socket = dir.join("coild.sock");
    let mut etcd_child = None;
    let mut store_args: Vec<String> = vec!["--store".into(), "embedded".into()];
    if etcd {
        etcd_child = Some(coil_testkit::start_etcd_in_netns(netns, dir, None).expect("etcd"));
        store_args = vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            "http://127.0.0.1:2379".into(),
        ];
    }
    let mut ctl = Command::new("ip");
    ctl.args(["netns", "exec", netns, COILCTL]);
    if etcd {
        ctl.args(["--etcd-endpoints", "http://127.0.0.1:2379"]);
    } else {
        ctl.args(["--store", "embedded", "--journal-dir"])
            .arg(dir.join("journal"));
    }
    let st = ctl
        .args(["pool", "create", "default"])
        .args(pool)
        .stdout(Stdio::null())
        .status()
        .expect("coilctl");
    assert!(st.success(), "pool create");
    // COIL_BENCH_COILD_LOG=FILE: coild's per-ADD timings (reserve, wire,
    // total, in coild) go to FILE, to tell coild's share from the plugin's.
    let log = std::env::var_os("COIL_BENCH_COILD_LOG").map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .expect("COIL_BENCH_COILD_LOG")
    });
    let child = Command::new("ip")
        .args(["netns", "exec", netns, COILD])
        .args(&store_args)
        .args(["--node-name", "bench-node", "--state-dir"])
        .arg(dir)
        .arg("--socket")
        .arg(&socket)
        .env(
            "COIL_LOG",
            if log.is_some() {
                "warn,coil_cli::coild::daemon::add=debug,coil_cli::coild::daemon::engine=debug,coil_cli::coild::server=debug,coil_adapters=debug"
            } else {
                "warn"
            },
        )
        .stdout(Stdio::null())
        .stderr(match &log {
            Some(f) => Stdio::from(f.try_clone().expect("log file")),
            None => Stdio::null(),
        })
        .spawn()
        .expect("coild");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "coild not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    Coild {
        child,
        socket,
        etcd: etcd_child,
    }
}

/// etcd's gRPC counters (inside the node netns, where the bench's etcd
/// listens on 127.0.0.1:2379).
struct EtcdGrpc {
    /// Unary calls received (Txn, Range, LeaseGrant, ...).
    unary: f64,
    /// Messages received on LeaseKeepAlive streams.
    keepalive_msgs: f64,
    /// LeaseKeepAlive streams started.
    keepalive_streams: f64,
}

fn etcd_grpc(node_ns: &str) -> EtcdGrpc {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            node_ns,
            "curl",
            "-sf",
            "http://127.0.0.1:2379/metrics",
        ])
        .output()
        .expect("curl etcd metrics");
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = |name: &str, with: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && with.iter().all(|w| l.contains(w)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    EtcdGrpc {
        unary: sum("grpc_server_msg_received_total", &["grpc_type=\"unary\""]),
        keepalive_msgs: sum(
            "grpc_server_msg_received_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        ),
        keepalive_streams: sum(
            "grpc_server_started_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        ),
    }
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// coild's counters, through its socket.
fn coild_stats(socket: &Path) -> serde_json::Value {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect coild");
    s.write_all(br#"{"stats":{}}"#).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    serde_json::from_str(&out).expect("json")
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the cni benchmark needs root (network namespaces)");
        std::process::exit(2);
    }
    if !Path::new(CNI_PATH).join("ptp").exists() {
        eprintln!("the baseline needs Debian's containernetworking-plugins ({CNI_PATH}/ptp)");
        std::process::exit(2);
    }
    eprintln!("coil plugin measured: {}", COIL.as_str());
    let n: usize = std::env::var("COIL_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("tempdir");
    let node_ns = "cbnode";
    let _ = Command::new("ip")
        .args(["netns", "del", node_ns])
        .stderr(Stdio::null())
        .status();
    sh(&["ip", "netns", "add", node_ns]);
    sh(&["ip", "-n", node_ns, "link", "set", "lo", "up"]);
    let node = File::open(format!("/run/netns/{node_ns}")).expect("node netns");

    let baseline = Plugin {
        name: "baseline",
        bin: format!("{CNI_PATH}/ptp"),
        conf: format!(
            r#"{{"cniVersion":"1.0.0","name":"bench","type":"ptp","ipMasq":false,"mtu":1500,
            "ipam":{{"type":"host-local","dataDir":"{}","ranges":[[{{"subnet":"10.123.0.0/16"}}]],
            "routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
            dir.path().join("host-local").display()
        ),
    };
    let coild_dir = dir.path().join("coild");
    std::fs::create_dir_all(&coild_dir).expect("dir");
    let coild = start_coild(node_ns, &coild_dir, false, SINGLE_POOL);
    let coil = Plugin {
        name: "cni",
        bin: COIL.clone(),
        conf: format!(
            r#"{{"cniVersion":"1.0.0","name":"bench","type":"coil","socket":"{}"}}"#,
            coild.socket.display()
        ),
    };

    // COIL_BENCH_QUICK=1: only coil's sequential ADDs against the floor, in
    // alternating rounds, for working on ADD latency (no summary written).
    if std::env::var_os("COIL_BENCH_QUICK").is_some() {
        let (mut add, mut fl) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (a, _, _) = sequential(&node, &coil, n / 3);
            add.extend(a);
            let (sq, hot) = floor(&node, node_ns, coil.conf.as_bytes(), 50);
            fl.push(sq.add());
            println!(
                "round: floor {:.2} ms (spawn {:.2} + wire {:.2} + fdatasync {:.2}); hot {:.2} ms (wire {:.2})",
                sq.add(), sq.spawn, sq.wire, sq.fsync, hot.add(), hot.wire
            );
        }
        let f = pct(&mut fl, 0.5);
        let (a50, a99) = (pct(&mut add, 0.5), pct(&mut add, 0.99));
        println!(
            "ADD p50 {a50:.2} ms, p99 {a99:.2} ms; floor {f:.2} ms; p50 / floor {:.2}",
            a50 / f
        );
        drop(coild);
        let _ = Command::new("ip").args(["netns", "del", node_ns]).status();
        return;
    }
    let mut figs: Vec<(String, f64, &str)> = Vec::new();
    println!(
        "{:<9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>10}",
        "plugin", "add p50", "add p99", "del p50", "del p99", "par8 p50", "burst100", "maxrss"
    );
    let mut rows = BTreeMap::new();
    // coild finishes DEL's veth teardown in the background; let each phase
    // start on a quiet kernel (ptp's DELs are synchronous).
    let quiesce = |pl: &Plugin| {
        if pl.name != "cni" {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while coild_stats(&coild.socket)["attachments"].as_u64() != Some(0) {
            assert!(Instant::now() < deadline, "coild never finished releasing");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for pl in [&baseline, &coil] {
        let (mut add, mut del, rss_seq) = sequential(&node, pl, n);
        quiesce(pl);
        let (mut par, _) = parallel(&node, pl, n, 8, "p");
        quiesce(pl);
        let (_, burst) = parallel(&node, pl, 100, 8, "b");
        quiesce(pl);
        let row = (
            pct(&mut add, 0.5),
            pct(&mut add, 0.99),
            pct(&mut del, 0.5),
            pct(&mut del, 0.99),
            pct(&mut par, 0.5),
            burst,
            rss_seq,
        );
        println!(
            "{:<9} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>9.2}ms {:>9.1}ms {:>7}KiB",
            pl.name, row.0, row.1, row.2, row.3, row.4, row.5, row.6
        );
        let p = pl.name;
        figs.push((format!("{p}.add.p50_ms"), row.0, "ms"));
        figs.push((format!("{p}.add.p99_ms"), row.1, "ms"));
        figs.push((format!("{p}.del.p50_ms"), row.2, "ms"));
        figs.push((format!("{p}.del.p99_ms"), row.3, "ms"));
        figs.push((format!("{p}.add.par8.p50_ms"), row.4, "ms"));
        figs.push((format!("{p}.burst100.wall_ms"), row.5, "ms"));
        figs.push((format!("{p}.plugin.maxrss_kib"), row.6 as f64, "KiB"));
        rows.insert(p, row);
    }
    // Churn: 20 reused pod netns, 300 ADD+DEL cycles, both plugins.
    let churn_cycles: usize = std::env::var("COIL_BENCH_CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut churn_rows = BTreeMap::new();
    for pl in [&baseline, &coil] {
        let (cycle, mut add, mut del) = churn(&node, pl, 20, churn_cycles);
        quiesce(pl);
        let row = (
            cycle,
            pct(&mut add, 0.5),
            pct(&mut add, 0.99),
            pct(&mut del, 0.5),
        );
        println!(
            "churn {:<9} cycle {:>7.2}ms  add p50 {:>6.2}ms p99 {:>6.2}ms  del p50 {:>6.2}ms",
            pl.name, row.0, row.1, row.2, row.3
        );
        let p = pl.name;
        figs.push((format!("{p}.churn.cycle_ms"), row.0, "ms"));
        figs.push((format!("{p}.churn.add.p50_ms"), row.1, "ms"));
        figs.push((format!("{p}.churn.add.p99_ms"), row.2, "ms"));
        figs.push((format!("{p}.churn.del.p50_ms"), row.3, "ms"));
        churn_rows.insert(p, row);
    }
    // The floor of an ADD, in the same run.
    let (sq, hot) = floor(&node, node_ns, coil.conf.as_bytes(), 100);
    let (fl, fl99) = (sq.add(), sq.p99);
    println!(
        "floor of an ADD: {fl:.2} ms = spawn {:.2} + wire {:.2} + fdatasync {:.2} \
         (p50s, each round spawning, wiring and syncing as an ADD does; p99 of whole rounds {fl99:.2} ms); \
         each part in a hot loop of its own: {:.2} ms = {:.2} + {:.2} + {:.2}",
        sq.spawn, sq.wire, sq.fsync, hot.add(), hot.spawn, hot.wire, hot.fsync
    );
    figs.push(("cni.floor.add_ms".into(), fl, "ms"));
    figs.push(("cni.floor.add_p99_ms".into(), fl99, "ms"));
    figs.push(("cni.floor.spawn_ms".into(), sq.spawn, "ms"));
    figs.push(("cni.floor.wire_ms".into(), sq.wire, "ms"));
    figs.push(("cni.floor.fsync_ms".into(), sq.fsync, "ms"));
    figs.push(("cni.floor.hot.add_ms".into(), hot.add(), "ms"));
    figs.push(("cni.floor.hot.wire_ms".into(), hot.wire, "ms"));

    // A dual-stack ADD next to a single-family one: a second node netns
    // with a coild serving a dual-stack pool, the two measured back to
    // back in alternating rounds so both see the same machine.
    let dual_ns = "cbnode6";
    let _ = Command::new("ip")
        .args(["netns", "del", dual_ns])
        .stderr(Stdio::null())
        .status();
    sh(&["ip", "netns", "add", dual_ns]);
    sh(&["ip", "-n", dual_ns, "link", "set", "lo", "up"]);
    sh(&[
        "ip",
        "netns",
        "exec",
        dual_ns,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    let node6 = File::open(format!("/run/netns/{dual_ns}")).expect("dual node netns");
    let dual_dir = dir.path().join("coild-dual");
    std::fs::create_dir_all(&dual_dir).expect("dir");
    let cd = start_coild(dual_ns, &dual_dir, false, DUAL_POOL);
    let dual = Plugin {
        name: "dual",
        bin: COIL.clone(),
        conf: format!(
            r#"{{"cniVersion":"1.0.0","name":"bench","type":"coil","socket":"{}"}}"#,
            cd.socket.display()
        ),
    };
    let (mut single_add, mut dual_add) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let (a, _, _) = sequential(&node, &coil, n / 2);
        single_add.extend(a);
        quiesce(&coil);
        let (a, _, _) = sequential(&node6, &dual, n / 2);
        dual_add.extend(a);
        let deadline = Instant::now() + Duration::from_secs(60);
        while coild_stats(&cd.socket)["attachments"].as_u64() != Some(0) {
            assert!(Instant::now() < deadline, "coild never finished releasing");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (s50, s99) = (pct(&mut single_add, 0.5), pct(&mut single_add, 0.99));
    let (d50, d99) = (pct(&mut dual_add, 0.5), pct(&mut dual_add, 0.99));
    println!(
        "dual-stack ADD: p50 {d50:.2} ms, p99 {d99:.2} ms; single-family in the same rounds: p50 {s50:.2} ms, p99 {s99:.2} ms; p50 ratio {:.2} (target <= 1.2) {}",
        d50 / s50,
        if d50 / s50 <= 1.2 { "met" } else { "MISSED" }
    );
    figs.push(("cni.add.single.p50_ms".into(), s50, "ms"));
    figs.push(("cni.add.dual.p50_ms".into(), d50, "ms"));
    figs.push(("cni.add.dual.p99_ms".into(), d99, "ms"));
    figs.push(("cni.add.dual.ratio".into(), d50 / s50, "x single-family"));
    drop(cd);
    drop(node6);
    let _ = Command::new("ip").args(["netns", "del", dual_ns]).status();

    // coild's memory with 250 pods.
    let pods = Pods::new("cr", 250);
    for p in &pods.names {
        let c = call(&node, &coil.bin, &env("ADD", p, true), coil.conf.as_bytes());
        assert!(c.ok, "ADD {p}");
    }
    let rss = rss_kib(coild.child.id());
    println!("coild RSS with 250 pods: {rss:.0} KiB");
    figs.push(("coild.rss_kib.250pods".into(), rss, "KiB"));
    for p in &pods.names {
        let _ = call(&node, &coil.bin, &env("DEL", p, true), coil.conf.as_bytes());
    }
    drop(pods);
    drop(coild);

    // etcd mode: requests per ADD once a block has room (the first ADD
    // leases it).
    let etcd_dir = dir.path().join("coild-etcd");
    std::fs::create_dir_all(&etcd_dir).expect("dir");
    let ce = start_coild(node_ns, &etcd_dir, true, SINGLE_POOL);
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"bench","type":"coil","socket":"{}"}}"#,
        ce.socket.display()
    );
    let pods = Pods::new("ce", 21);
    let first = call(
        &node,
        &COIL,
        &env("ADD", &pods.names[0], true),
        conf.as_bytes(),
    );
    assert!(first.ok, "first ADD in etcd mode");
    std::thread::sleep(Duration::from_millis(300));
    let before = coild_stats(&ce.socket);
    for p in &pods.names[1..] {
        let c = call(&node, &COIL, &env("ADD", p, true), conf.as_bytes());
        assert!(c.ok, "ADD {p} (etcd mode)");
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = coild_stats(&ce.socket);
    let adds = (pods.names.len() - 1) as f64;
    let delta =
        |k: &str| after[k].as_f64().unwrap_or(f64::NAN) - before[k].as_f64().unwrap_or(f64::NAN);
    let hot = delta("add_path_store_calls") / adds;
    let all = delta("store_requests") / adds;
    println!("etcd requests per ADD with room: {hot:.2} on the ADD path (target 0); {all:.2} in all, with the asynchronous address index mirror and heartbeats");
    figs.push((
        "cni.add.etcd_requests".into(),
        hot,
        "requests/ADD on the ADD path",
    ));
    figs.push((
        "cni.add.etcd_requests_async".into(),
        all,
        "requests/ADD incl. async index mirror",
    ));
    for p in &pods.names {
        let _ = call(&node, &COIL, &env("DEL", p, true), conf.as_bytes());
    }
    drop(pods);
    // An idle node's load on etcd, by etcd's own counters.
    std::thread::sleep(Duration::from_secs(2));
    let idle = Duration::from_secs(30);
    let m0 = etcd_grpc(node_ns);
    std::thread::sleep(idle);
    let m1 = etcd_grpc(node_ns);
    let per_s = |a: f64, b: f64| (b - a) / idle.as_secs_f64();
    let unary = per_s(m0.unary, m1.unary);
    let keepalives = per_s(m0.keepalive_msgs, m1.keepalive_msgs);
    let streams = m1.keepalive_streams - m0.keepalive_streams;
    println!(
        "idle coild, 30 s, by etcd's metrics: {unary:.3} unary requests/s, {keepalives:.3} keep-alive messages/s on {streams} new stream(s) (target: <= 0.2 requests/s per idle node)"
    );
    figs.push(("coild.idle.etcd_requests_per_s".into(), unary, "requests/s"));
    figs.push((
        "coild.idle.etcd_keepalives_per_s".into(),
        keepalives,
        "messages/s",
    ));
    figs.push((
        "coild.idle.etcd_keepalive_streams".into(),
        streams,
        "streams opened in 30 s",
    ));
    drop(ce);
    let _ = Command::new("ip").args(["netns", "del", node_ns]).status();

    let b = rows["baseline"];
    let c = rows["cni"];
    println!();
    println!("ratios (coil / ptp+host-local):");
    let check = |name: &str, r: f64, target: f64| {
        println!(
            "  {name:<12} {r:>6.3}  (target <= {target}) {}",
            if r <= target { "met" } else { "MISSED" }
        );
    };
    check("add p50", c.0 / b.0, 0.15);
    check("add p99", c.1 / b.1, 0.25);
    check("del p50", c.2 / b.2, 0.6);
    println!(
        "  burst of 100 pods, 8 callers: {:.0} ms (target < 1000) {}",
        c.5,
        if c.5 < 1000.0 { "met" } else { "MISSED" }
    );
    let bc = churn_rows["baseline"];
    let cc = churn_rows["cni"];
    check("churn cycle", cc.0 / bc.0, 0.25);
    println!(
        "  churn ADD p99: {:.2} ms (target < 10) {}",
        cc.2,
        if cc.2 < 10.0 { "met" } else { "MISSED" }
    );
    println!(
        "  ADD p50 / floor: {:.2} (target <= 1.2); ADD p99 / floor: {:.2} (target <= 1.5); \
         ADD p99 / the floor's own p99: {:.2}",
        c.0 / fl,
        c.1 / fl,
        c.1 / fl99
    );
    figs.push((
        "cni.add.p99.floor_p99_ratio".into(),
        c.1 / fl99,
        "x floor p99",
    ));
    figs.push(("cni.churn.cycle.ratio".into(), cc.0 / bc.0, "x baseline"));
    figs.push(("cni.add.p50.floor_ratio".into(), c.0 / fl, "x floor"));
    figs.push(("cni.add.p99.floor_ratio".into(), c.1 / fl, "x floor"));
    figs.push(("cni.add.p50.ratio".into(), c.0 / b.0, "x baseline"));
    figs.push(("cni.add.p99.ratio".into(), c.1 / b.1, "x baseline"));
    figs.push(("cni.del.p50.ratio".into(), c.2 / b.2, "x baseline"));
    coil_testkit::write_bench_summary(&figs).expect("summary");
}
