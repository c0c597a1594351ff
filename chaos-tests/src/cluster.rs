//! The multi-node chaos mode (`chaos-tests/run --cluster`).
//!
//! Everything lives in network namespaces this process creates and deletes:
//! a hub with a bridge, a 3-member etcd cluster, three nodes each running
//! coild (the failpoint build) with pods as network namespaces, two
//! coil-controller replicas and an admin namespace for coilctl, all on
//! 10.198.0.0/16, which exists only inside those namespaces. A seeded
//! schedule kills (kill -9) coild, controller replicas and etcd members (two
//! at once: quorum lost), partitions nodes, etcd members and the controller
//! leader from the hub (link down, some longer than liveness TTL + grace),
//! reboots nodes and powers one off, removes it with `coilctl node remove`,
//! brings it back fenced and readmits it. The checker reads the truth from
//! the kernel: the pods' eth0 addresses and each node's table 119.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{call_plugin, sh_quiet, write_summary, Args, Res, FAILPOINTS};

const NODES: usize = 3;
const MEMBERS: usize = 3;
const CONTROLLERS: usize = 2;
const POOL: &str = "10.197.0.0/23";
const BLOCK_SIZE: &str = "3";
const MIN_BLOCKS: usize = 1;
/// coild's --liveness-ttl and the controllers' --grace-period, in seconds:
/// a "long" partition outlasts both.
const TTL_S: u64 = 2;
const GRACE_S: u64 = 2;
/// Pods a node's callers keep alive at least (then ADD and DEL alternate).
const LIVE_TARGET: usize = 14;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Runs a command; None when it could not be spawned.
fn run(args: &[&str]) -> Option<Output> {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .ok()
}

fn ok(args: &[&str]) -> bool {
    run(args).is_some_and(|o| o.status.success())
}

fn stdout(o: &Option<Output>) -> String {
    o.as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn status_ok(o: &Option<Output>) -> bool {
    o.as_ref().is_some_and(|o| o.status.success())
}

fn describe(o: &Option<Output>) -> String {
    match o {
        None => "could not run".into(),
        Some(o) => format!(
            "{} {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
    }
}

fn netns_list() -> Vec<String> {
    stdout(&run(&["ip", "netns", "list"]))
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

/// A process this harness started, in a namespace, by pid.
struct Proc {
    name: String,
    ns: String,
    argv: Vec<String>,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Proc {
    fn new(name: &str, ns: &str, argv: Vec<String>, log: PathBuf) -> Proc {
        Proc {
            name: name.into(),
            ns: ns.into(),
            argv,
            log,
            child: Mutex::new(None),
        }
    }

    fn running(&self) -> bool {
        self.child.lock().expect("proc").is_some()
    }

    fn start(&self, env: &[(&str, &str)]) -> Result<(), String> {
        let mut g = self.child.lock().expect("proc");
        if g.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns])
            .args(&self.argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        // `ip netns exec` execs the command: the child's pid is its pid.
        let child = c.spawn().map_err(|e| format!("spawn {}: {e}", self.name))?;
        *g = Some(child);
        Ok(())
    }

    /// SIGKILL by pid and reap; false when it was not running.
    fn kill(&self) -> bool {
        match self.child.lock().expect("proc").take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
                true
            }
            None => false,
        }
    }

    /// Some(status) when it exited on its own.
    fn reap(&self) -> Option<ExitStatus> {
        let mut g = self.child.lock().expect("proc");
        let st = g.as_mut()?.try_wait().ok().flatten()?;
        *g = None;
        Some(st)
    }
}

struct CNode {
    idx: usize,
    name: String,
    ns: String,
    link: String,
    dir: PathBuf,
    socket: PathBuf,
    coild: Proc,
    boot: AtomicU64,
    paused: AtomicBool,
    inflight: AtomicUsize,
    /// Powered off, removed or fenced: the fault schedule leaves it alone.
    out: AtomicBool,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    add_ok: AtomicU64,
    add_err: AtomicU64,
    del_ok: AtomicU64,
    del_err: AtomicU64,
    retryable: AtomicU64,
    coild_kills: AtomicU64,
    failpoint_kills: AtomicU64,
    controller_kills: AtomicU64,
    etcd_kills: AtomicU64,
    quorum_losses: AtomicU64,
    partitions: AtomicU64,
    long_partitions: AtomicU64,
    node_partitions: AtomicU64,
    etcd_partitions: AtomicU64,
    leader_partitions: AtomicU64,
    reboots: AtomicU64,
    removals: AtomicU64,
    fenced_refusals: AtomicU64,
    fenced_other_errors: AtomicU64,
    readmits: AtomicU64,
    samples: AtomicU64,
    restarts_on_own: AtomicU64,
    long_node_partitions_checked: AtomicU64,
    unreachable_noted: AtomicU64,
}

#[derive(Default)]
struct NodeModel {
    /// ADD answered success, not deleted since: cid -> (netns, address).
    live: BTreeMap<String, (String, IpAddr)>,
    /// Must be DELeted, with its netns if it still exists.
    to_del: Vec<(String, Option<String>)>,
}

#[derive(Default)]
struct Model {
    nodes: Vec<NodeModel>,
    violations: Vec<String>,
    /// Every address an ADD answered (checked against the index at the end).
    seen: BTreeSet<IpAddr>,
    next: u64,
}

struct Cluster {
    pfx: String,
    hub: String,
    adm: String,
    dir: PathBuf,
    bins: PathBuf,
    endpoints: String,
    etcd: Vec<Proc>,
    etcd_links: Vec<String>,
    ctrls: Vec<Proc>,
    ctrl_ns: Vec<String>,
    ctrl_links: Vec<String>,
    nodes: Vec<CNode>,
    model: Mutex<Model>,
    c: Counters,
    stop: AtomicBool,
    torn: AtomicBool,
    log: Mutex<Vec<String>>,
}

/// Tears the cluster down when dropped (normal end, panic, Ctrl-C).
struct Guard(Arc<Cluster>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

impl Cluster {
    fn bin(&self, name: &str) -> String {
        self.bins.join(name).display().to_string()
    }

    fn note(&self, s: String) {
        println!("  event: {s}");
        self.log.lock().expect("log").push(s);
    }

    fn violation(&self, v: String) {
        eprintln!("VIOLATION: {v}");
        self.model.lock().expect("model").violations.push(v);
    }

    fn teardown(&self) {
        if self.torn.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        // Callers finish their call (bounded), so none creates a pod
        // namespace after the listing below.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .nodes
            .iter()
            .any(|n| n.inflight.load(Ordering::SeqCst) > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for n in &self.nodes {
            n.coild.kill();
        }
        for c in &self.ctrls {
            c.kill();
        }
        for e in &self.etcd {
            e.kill();
        }
        let mut all: Vec<String> = netns_list()
            .into_iter()
            .filter(|n| n.starts_with(&self.pfx))
            .collect();
        // The hub last: its veths go with the members.
        all.sort_by_key(|n| *n == self.hub);
        for n in all {
            let _ = sh_quiet(&["ip", "netns", "del", &n]);
        }
    }

    fn in_ns(&self, ns: &str, args: &[&str]) -> Option<Output> {
        let mut v = vec!["ip", "netns", "exec", ns];
        v.extend_from_slice(args);
        run(&v)
    }

    /// coilctl against the etcd cluster from the admin namespace.
    fn ctl(&self, args: &[&str]) -> Option<Output> {
        let b = self.bin("coilctl");
        let mut v = vec![
            b.as_str(),
            "--etcd-endpoints",
            &self.endpoints,
            "--etcd-timeout",
            "2s",
        ];
        v.extend_from_slice(args);
        self.in_ns(&self.adm, &v)
    }

    fn ctl_json(&self, args: &[&str]) -> Option<Value> {
        let o = self.ctl(args);
        if !status_ok(&o) {
            return None;
        }
        serde_json::from_str(&stdout(&o)).ok()
    }

    /// The blocks etcd leases to a node; None when etcd does not answer.
    fn leased(&self, node: &str) -> Option<BTreeSet<String>> {
        let v = self.ctl_json(&["node", "blocks", node, "--json"])?;
        Some(
            v.as_array()?
                .iter()
                .filter_map(|b| b["block"].as_str().map(String::from))
                .collect(),
        )
    }

    /// Every lease in the pool: block -> node.
    fn pool_leases(&self) -> Option<BTreeMap<String, String>> {
        let v = self.ctl_json(&["pool", "show", "default", "--json"])?;
        Some(
            v["leases"]
                .as_array()?
                .iter()
                .filter_map(|l| Some((l["block"].as_str()?.into(), l["node"].as_str()?.into())))
                .collect(),
        )
    }

    fn table119(&self, n: &CNode) -> BTreeSet<String> {
        stdout(&self.in_ns(&n.ns, &["ip", "route", "show", "table", "119"]))
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|b| {
                if b.contains('/') {
                    b.into()
                } else {
                    format!("{b}/32")
                }
            })
            .collect()
    }

    fn coil_links(&self, n: &CNode) -> Vec<String> {
        stdout(&self.in_ns(&n.ns, &["ip", "-o", "link", "show"]))
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .filter(|s| s.starts_with("coil"))
            .collect()
    }

    fn set_boot(&self, n: &CNode, b: u64) -> Result<(), String> {
        n.boot.store(b, Ordering::SeqCst);
        std::fs::write(
            n.dir.join("boot_id"),
            format!("chaos-{}-boot-{b}\n", n.name),
        )
        .map_err(|e| format!("boot id of {}: {e}", n.name))
    }

    fn start_coild(&self, n: &CNode, failpoint: Option<&str>) -> Result<(), String> {
        if n.coild.running() {
            return Ok(());
        }
        let _ = std::fs::remove_file(&n.socket);
        let mut env = vec![("COIL_LOG", "warn")];
        if let Some(fp) = failpoint {
            env.push(("COIL_FAILPOINTS", fp));
        }
        n.coild.start(&env)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if n.socket.exists() {
                return Ok(());
            }
            if let Some(st) = n.coild.reap() {
                return Err(format!("coild of {} exited at start: {st}", n.name));
            }
            if Instant::now() > deadline || interrupted() {
                n.coild.kill();
                return Err(format!("coild of {} did not become ready", n.name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ensure_coild(&self, n: &CNode) {
        for attempt in 0..5 {
            if interrupted() {
                return;
            }
            match self.start_coild(n, None) {
                Ok(()) => return,
                Err(e) => {
                    eprintln!("  {e} (attempt {attempt})");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        self.violation(format!("coild of {} could not be started again", n.name));
    }

    fn stats(&self, n: &CNode) -> Value {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&n.socket) else {
            return Value::Null;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.write_all(br#"{"stats":{}}"#);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    fn link(&self, name: &str, up: bool) -> bool {
        ok(&[
            "ip",
            "-n",
            &self.hub,
            "link",
            "set",
            name,
            if up { "up" } else { "down" },
        ])
    }

    /// The controller replica that says it leads (its metrics).
    fn leader(&self) -> Option<usize> {
        (0..CONTROLLERS).find(|&i| {
            stdout(&self.in_ns(
                &self.ctrl_ns[i],
                &["curl", "-s", "-m", "1", "http://127.0.0.1:9400/metrics"],
            ))
            .lines()
            .any(|l| l.trim() == "coil_controller_leader 1")
        })
    }

    /// Halts a node's callers and waits for the calls in flight.
    fn pause(&self, n: &CNode) {
        n.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(90);
        while n.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What a reboot or a power cut leaves: no pod, no coil veth, no route
    /// of coil's, a new boot id. The runtime DELs the dead sandboxes later.
    fn wipe(&self, n: &CNode) -> Result<(), String> {
        {
            let mut m = self.model.lock().expect("model");
            let nm = &mut m.nodes[n.idx];
            let live: Vec<(String, (String, IpAddr))> =
                std::mem::take(&mut nm.live).into_iter().collect();
            for (cid, (ns, _)) in live {
                let _ = sh_quiet(&["ip", "netns", "del", &ns]);
                nm.to_del.push((cid, None));
            }
            for item in nm.to_del.iter_mut() {
                if let Some(ns) = item.1.take() {
                    let _ = sh_quiet(&["ip", "netns", "del", &ns]);
                }
            }
        }
        for l in self.coil_links(n) {
            let _ = self.in_ns(&n.ns, &["ip", "link", "del", &l]);
        }
        let _ = self.in_ns(&n.ns, &["ip", "route", "flush", "table", "119"]);
        let _ = self.in_ns(&n.ns, &["ip", "route", "flush", "proto", "30"]);
        self.set_boot(n, n.boot.load(Ordering::SeqCst) + 1)
    }
}

fn cni(cl: &Cluster, n: &CNode, cmd: &str, cid: &str, netns: Option<&str>) -> Res {
    call_plugin(&cl.bin("coil"), &n.socket, cmd, cid, netns)
}

fn answered_ip(r: &Res) -> Option<IpAddr> {
    r.out["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse::<IpAddr>().ok())
}

fn cni_code(r: &Res) -> Option<u64> {
    r.out.get("code").and_then(Value::as_u64)
}

fn check_error(cl: &Cluster, what: &str, r: &Res) {
    match cni_code(r) {
        Some(11) => {
            cl.c.retryable.fetch_add(1, Ordering::Relaxed);
        }
        Some(_) => {}
        None => cl.violation(format!(
            "{what} failed (exit {}) without a CNI error: {}",
            r.code, r.out
        )),
    }
}

/// True when `ip` is inside the IPv4 CIDR `block`.
fn block_contains(block: &str, ip: IpAddr) -> bool {
    let (IpAddr::V4(ip), Some((net, len))) = (ip, block.split_once('/')) else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    if len > 32 {
        return false;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

fn new_pod(cl: &Cluster, n: &CNode) -> Option<(String, String)> {
    let seq = {
        let mut m = cl.model.lock().expect("model");
        m.next += 1;
        m.next
    };
    let cid = format!("chaos-{}-{seq:06}", n.name);
    let ns = format!("{}p{}x{seq:06}", cl.pfx, n.idx);
    sh_quiet(&["ip", "netns", "add", &ns]).then_some((cid, ns))
}

fn worker(cl: Arc<Cluster>, idx: usize, seed: u64, max_ops: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = &cl.nodes[idx];
    let mut ops = 0u64;
    while !cl.stop.load(Ordering::SeqCst) && !interrupted() && ops < max_ops {
        ops += 1;
        if n.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        n.inflight.fetch_add(1, Ordering::SeqCst);
        if n.paused.load(Ordering::SeqCst) {
            n.inflight.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let good = one_op(&cl, n, &mut rng);
        n.inflight.fetch_sub(1, Ordering::SeqCst);
        // A runtime backs off after an error, and never hammers.
        let pause = if good { 10..60 } else { 40..200 };
        std::thread::sleep(Duration::from_millis(rng.gen_range(pause)));
    }
}

fn one_op(cl: &Cluster, n: &CNode, rng: &mut StdRng) -> bool {
    let (live_n, pending) = {
        let m = cl.model.lock().expect("model");
        (m.nodes[n.idx].live.len(), m.nodes[n.idx].to_del.len())
    };
    cl.c.ops.fetch_add(1, Ordering::Relaxed);
    if pending > 0 && rng.gen_bool(0.5) {
        let item = {
            let mut m = cl.model.lock().expect("model");
            let td = &mut m.nodes[n.idx].to_del;
            if td.is_empty() {
                return true;
            }
            let i = rng.gen_range(0..td.len());
            td.swap_remove(i)
        };
        let r = cni(cl, n, "DEL", &item.0, item.1.as_deref());
        if r.code == 0 {
            cl.c.del_ok.fetch_add(1, Ordering::Relaxed);
            if let Some(ns) = &item.1 {
                let _ = sh_quiet(&["ip", "netns", "del", ns]);
            }
            return true;
        }
        cl.c.del_err.fetch_add(1, Ordering::Relaxed);
        check_error(cl, "DEL", &r);
        cl.model.lock().expect("model").nodes[n.idx]
            .to_del
            .push(item);
        return false;
    }
    if live_n < LIVE_TARGET || rng.gen_bool(0.45) {
        let Some((cid, ns)) = new_pod(cl, n) else {
            return false;
        };
        let r = cni(cl, n, "ADD", &cid, Some(&ns));
        match (r.code, answered_ip(&r)) {
            (0, Some(ip)) => {
                cl.c.add_ok.fetch_add(1, Ordering::Relaxed);
                let mut m = cl.model.lock().expect("model");
                let other = m.nodes.iter().enumerate().find_map(|(i, nm)| {
                    nm.live
                        .iter()
                        .find(|(_, (_, a))| *a == ip)
                        .map(|(c, _)| format!("{c} on node {i}"))
                });
                m.seen.insert(ip);
                m.nodes[n.idx].live.insert(cid.clone(), (ns, ip));
                drop(m);
                if let Some(other) = other {
                    cl.violation(format!(
                        "ADD of {cid} on {} answered {ip}, which {other} still holds",
                        n.name
                    ));
                }
                true
            }
            _ => {
                cl.c.add_err.fetch_add(1, Ordering::Relaxed);
                check_error(cl, "ADD", &r);
                cl.model.lock().expect("model").nodes[n.idx]
                    .to_del
                    .push((cid, Some(ns)));
                false
            }
        }
    } else {
        let mut m = cl.model.lock().expect("model");
        let nm = &mut m.nodes[n.idx];
        if nm.live.is_empty() {
            return true;
        }
        let i = rng.gen_range(0..nm.live.len());
        if let Some(k) = nm.live.keys().nth(i).cloned() {
            if let Some((ns, _)) = nm.live.remove(&k) {
                nm.to_del.push((k, Some(ns)));
            }
        }
        true
    }
}

/// The live truth: every pod netns's eth0 addresses, by address.
fn pod_addresses(cl: &Cluster) -> BTreeMap<IpAddr, Vec<String>> {
    let script = format!(
        "for n in $(ip netns list | awk '{{print $1}}' | grep '^{}p'); do \
         ip -n $n -o -4 addr show dev eth0 2>/dev/null | sed \"s/^/$n /\"; done",
        cl.pfx
    );
    let mut out: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for l in stdout(&run(&["bash", "-c", &script])).lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && f[3] == "inet" {
            if let Some(ip) = f[4].split('/').next().and_then(|a| a.parse().ok()) {
                out.entry(ip).or_default().push(f[0].to_string());
            }
        }
    }
    out
}

/// The checks that hold at every moment: no address on two live pods, no
/// block in two nodes' table 119. Returns (pods seen, duplicates).
fn sample(cl: &Cluster, when: &str) -> usize {
    cl.c.samples.fetch_add(1, Ordering::Relaxed);
    let addrs = pod_addresses(cl);
    for (ip, pods) in &addrs {
        if pods.len() > 1 {
            cl.violation(format!(
                "{when}: address {ip} is on the eth0 of pods {pods:?}"
            ));
        }
    }
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for n in &cl.nodes {
        for b in cl.table119(n) {
            if let Some(o) = owner.insert(b.clone(), n.name.clone()) {
                cl.violation(format!(
                    "{when}: block {b} is in the table 119 of both {o} and {}",
                    n.name
                ));
            }
        }
    }
    addrs.len()
}

enum Sched {
    /// Heal a link; for a node cut off longer than TTL + grace, first
    /// check that it kept its blocks.
    Heal(String, Option<usize>),
    StartEtcd(usize),
    StartCtrl(usize),
}

/// How a removed node powers on: its fence is checked both when coild can
/// learn it at start and when it cannot.
#[derive(Clone, Copy, Debug)]
enum Boot {
    /// Once etcd answers the admin (up to 20 s late).
    WhenEtcdAnswers,
    /// Whatever etcd's state.
    Anyway,
    /// With its own link down for the fenced ADDs: it cannot reach etcd.
    CutOff,
}

/// The removal scenario, one stage per tick so the fault schedule (heals,
/// restarts) goes on meanwhile.
enum Removal {
    None,
    /// Powered off; `coilctl node remove` retried until accepted.
    Off {
        node: usize,
        since: Instant,
        old: BTreeSet<String>,
    },
    /// Removed; others may lease its blocks until it powers on.
    Removed {
        node: usize,
        until: Instant,
        old: BTreeSet<String>,
        boot: Boot,
    },
    /// Back up, fenced: its table 119 is checked once etcd has answered
    /// for two resyncs (or after 30 s).
    Fenced {
        node: usize,
        old: BTreeSet<String>,
        up_since: Option<Instant>,
        deadline: Instant,
    },
    /// `coilctl node readmit` retried until accepted.
    Readmit {
        node: usize,
        deadline: Instant,
    },
    /// Readmitted: it must serve an ADD again.
    Readmitting {
        node: usize,
        deadline: Instant,
    },
}

fn setup(args: &Args, dir: &Path) -> Result<Arc<Cluster>, String> {
    let pfx = format!("ck{}", std::process::id() % 100_000);
    for n in netns_list() {
        if n.starts_with(&pfx) {
            let _ = sh_quiet(&["ip", "netns", "del", &n]);
        }
    }
    let bins = std::fs::canonicalize(&args.bin_dir)
        .map_err(|e| format!("{}: {e}", args.bin_dir.display()))?;
    let hub = format!("{pfx}hub");
    let etcd_ip = |i: usize| format!("10.198.1.{}", i + 1);
    let endpoints = (0..MEMBERS)
        .map(|i| format!("http://{}:2379", etcd_ip(i)))
        .collect::<Vec<_>>()
        .join(",");
    let initial = (0..MEMBERS)
        .map(|i| format!("e{i}=http://{}:2380", etcd_ip(i)))
        .collect::<Vec<_>>()
        .join(",");
    let mut etcd = Vec::new();
    for i in 0..MEMBERS {
        let ip = etcd_ip(i);
        let argv = vec![
            "etcd".to_string(),
            "--name".into(),
            format!("e{i}"),
            "--data-dir".into(),
            dir.join(format!("etcd{i}")).display().to_string(),
            "--listen-client-urls".into(),
            format!("http://{ip}:2379"),
            "--advertise-client-urls".into(),
            format!("http://{ip}:2379"),
            "--listen-peer-urls".into(),
            format!("http://{ip}:2380"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{ip}:2380"),
            "--initial-cluster".into(),
            initial.clone(),
            "--initial-cluster-state".into(),
            "new".into(),
            "--initial-cluster-token".into(),
            "coil-chaos".into(),
            "--heartbeat-interval".into(),
            "100".into(),
            "--election-timeout".into(),
            "1000".into(),
            "--log-level".into(),
            "error".into(),
        ];
        etcd.push(Proc::new(
            &format!("etcd e{i}"),
            &format!("{pfx}e{i}"),
            argv,
            dir.join(format!("etcd{i}.log")),
        ));
    }
    let ctl_bin = bins.join("coil-controller").display().to_string();
    let mut ctrls = Vec::new();
    for i in 0..CONTROLLERS {
        let argv = vec![
            ctl_bin.clone(),
            "--etcd-endpoints".into(),
            endpoints.clone(),
            "--etcd-timeout".into(),
            "1s".into(),
            "--grace-period".into(),
            format!("{GRACE_S}s"),
            "--interval".into(),
            "1s".into(),
            "--election-ttl".into(),
            "2s".into(),
            "--identity".into(),
            format!("c{i}"),
            "--metrics-addr".into(),
            "127.0.0.1:9400".into(),
        ];
        ctrls.push(Proc::new(
            &format!("controller c{i}"),
            &format!("{pfx}c{i}"),
            argv,
            dir.join(format!("controller{i}.log")),
        ));
    }
    let coild_bin = bins.join("coild").display().to_string();
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let ndir = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&ndir).map_err(|e| format!("{}: {e}", ndir.display()))?;
        let socket = ndir.join("coild.sock");
        let name = format!("chaos-n{i}");
        let argv = vec![
            coild_bin.clone(),
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            endpoints.clone(),
            "--etcd-timeout".into(),
            "1s".into(),
            "--node-name".into(),
            name.clone(),
            "--resync-interval".into(),
            "1s".into(),
            "--min-blocks".into(),
            MIN_BLOCKS.to_string(),
            "--liveness-ttl".into(),
            format!("{TTL_S}s"),
            "--state-dir".into(),
            ndir.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--boot-id-file".into(),
            ndir.join("boot_id").display().to_string(),
        ];
        nodes.push(CNode {
            idx: i,
            name,
            ns: format!("{pfx}n{i}"),
            link: format!("n{i}"),
            coild: Proc::new(
                &format!("coild n{i}"),
                &format!("{pfx}n{i}"),
                argv,
                ndir.join("coild.log"),
            ),
            dir: ndir,
            socket,
            boot: AtomicU64::new(1),
            paused: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            out: AtomicBool::new(false),
        });
    }
    let cl = Arc::new(Cluster {
        pfx: pfx.clone(),
        hub: hub.clone(),
        adm: format!("{pfx}adm"),
        dir: dir.to_path_buf(),
        bins,
        endpoints,
        etcd,
        etcd_links: (0..MEMBERS).map(|i| format!("e{i}")).collect(),
        ctrls,
        ctrl_ns: (0..CONTROLLERS).map(|i| format!("{pfx}c{i}")).collect(),
        ctrl_links: (0..CONTROLLERS).map(|i| format!("c{i}")).collect(),
        nodes,
        model: Mutex::new(Model {
            nodes: (0..NODES).map(|_| NodeModel::default()).collect(),
            ..Model::default()
        }),
        c: Counters::default(),
        stop: AtomicBool::new(false),
        torn: AtomicBool::new(false),
        log: Mutex::new(Vec::new()),
    });
    Ok(cl)
}

fn must(args: &[&str]) -> Result<(), String> {
    let o = run(args);
    if status_ok(&o) {
        Ok(())
    } else {
        Err(format!("{args:?}: {}", describe(&o)))
    }
}

/// The namespaces and links: hub bridge, one veth per member.
fn wire(cl: &Cluster) -> Result<(), String> {
    let hub = &cl.hub;
    must(&["ip", "netns", "add", hub])?;
    must(&["ip", "-n", hub, "link", "set", "lo", "up"])?;
    must(&["ip", "-n", hub, "link", "add", "br0", "type", "bridge"])?;
    must(&["ip", "-n", hub, "link", "set", "br0", "up"])?;
    let mut members: Vec<(String, String, String)> =
        vec![(format!("{}adm", cl.pfx), "adm".into(), "10.198.0.1".into())];
    for i in 0..MEMBERS {
        members.push((
            format!("{}e{i}", cl.pfx),
            cl.etcd_links[i].clone(),
            format!("10.198.1.{}", i + 1),
        ));
    }
    for n in &cl.nodes {
        members.push((
            n.ns.clone(),
            n.link.clone(),
            format!("10.198.2.{}", n.idx + 1),
        ));
    }
    for i in 0..CONTROLLERS {
        members.push((
            cl.ctrl_ns[i].clone(),
            cl.ctrl_links[i].clone(),
            format!("10.198.3.{}", i + 1),
        ));
    }
    for (ns, link, ip) in &members {
        must(&["ip", "netns", "add", ns])?;
        must(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        must(&[
            "ip", "-n", hub, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ])?;
        must(&["ip", "-n", hub, "link", "set", link, "master", "br0", "up"])?;
        must(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/16"),
            "dev",
            "eth0",
        ])?;
        must(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
    }
    Ok(())
}

fn boot_cluster(cl: &Cluster) -> Result<(), String> {
    for e in &cl.etcd {
        e.start(&[])?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = cl.ctl(&[
            "pool",
            "create",
            "default",
            POOL,
            "--block-size",
            BLOCK_SIZE,
        ]);
        if status_ok(&o) {
            break;
        }
        if Instant::now() > deadline || interrupted() {
            return Err(format!("pool create: {}", describe(&o)));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    for n in &cl.nodes {
        cl.set_boot(n, 1)?;
        cl.start_coild(n, None)?;
    }
    for c in &cl.ctrls {
        c.start(&[("COIL_LOG", "warn")])?;
    }
    Ok(())
}

pub fn main(args: &Args) -> i32 {
    let t0 = Instant::now();
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let dir = match tempfile::Builder::new()
        .prefix("coil-chaos-cluster-")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("chaos: tempdir: {e}");
            return 2;
        }
    };
    let cl = match setup(args, dir.path()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chaos: {e}");
            return 2;
        }
    };
    let guard = Guard(cl.clone());
    if let Err(e) = wire(&cl).and_then(|()| boot_cluster(&cl)) {
        eprintln!("chaos: setting the cluster up: {e}");
        drop(guard);
        return 2;
    }
    let workers_per_node = if args.workers_given { args.workers } else { 2 };
    println!(
        "chaos --cluster: seed {} for {:?}, {NODES} nodes x {workers_per_node} callers, \
         {MEMBERS} etcd members, {CONTROLLERS} controllers (netns {}*, dir {})",
        args.seed,
        args.duration,
        cl.pfx,
        dir.path().display()
    );
    let start = Instant::now();
    let workers: Vec<_> = (0..NODES)
        .flat_map(|i| (0..workers_per_node).map(move |w| (i, w)))
        .map(|(i, w)| {
            let c = cl.clone();
            let seed = args
                .seed
                .wrapping_add(1 + (i * workers_per_node + w) as u64);
            // Bounded in count too: a call takes at least 10 ms.
            let max_ops = args.duration.as_millis() as u64 / 10 + 100;
            std::thread::spawn(move || worker(c, i, seed, max_ops))
        })
        .collect();
    chaos(&cl, args, start);
    cl.stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    let code = if interrupted() {
        eprintln!("chaos: interrupted; cleaning up");
        130
    } else {
        converge(&cl);
        finish(&cl, args, t0.elapsed())
    };
    drop(guard);
    if code == 1 {
        // Keep the logs and journals of a failing run, not etcd's data
        // (some 120 MB a member, preallocated).
        let kept = dir.keep();
        for i in 0..MEMBERS {
            let _ = std::fs::remove_dir_all(kept.join(format!("etcd{i}")));
        }
        println!("  logs kept in {}", kept.display());
    }
    code
}

fn restart_on_own(cl: &Cluster, calm: bool) {
    for n in &cl.nodes {
        if n.out.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(st) = n.coild.reap() {
            use std::os::unix::process::ExitStatusExt;
            if st.signal() == Some(libc::SIGABRT) && !calm {
                cl.c.failpoint_kills.fetch_add(1, Ordering::Relaxed);
            } else {
                cl.violation(format!(
                    "coild of {} died on its own ({st}); see {}",
                    n.name,
                    n.coild.log.display()
                ));
            }
            cl.ensure_coild(n);
        }
    }
    for p in cl.etcd.iter().chain(cl.ctrls.iter()) {
        if let Some(st) = p.reap() {
            use std::os::unix::process::ExitStatusExt;
            // A panic (101) or a signal is a crash; any other exit a
            // refusal to run without the store, which a supervisor restarts.
            if st.signal().is_some() || st.code() == Some(101) {
                cl.violation(format!(
                    "{} crashed ({st}); see {}",
                    p.name,
                    p.log.display()
                ));
            } else {
                cl.note(format!("{} exited ({st}); restarted", p.name));
                cl.c.restarts_on_own.fetch_add(1, Ordering::Relaxed);
            }
            let _ = p.start(&[("COIL_LOG", "warn")]);
        }
    }
}

fn chaos(cl: &Cluster, args: &Args, start: Instant) {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let chaos_until = args.duration.mul_f64(0.85);
    let mut sched: Vec<(Instant, Sched)> = Vec::new();
    let mut down: BTreeSet<String> = BTreeSet::new();
    let mut removal = Removal::None;
    let mut k = 0usize;
    let mut last_sample = Instant::now();
    let mut last_report = Instant::now();
    let mut calm = false;
    let mut ticks = 0u64;
    // Bounded: at most one tick per 100 ms for the duration.
    let max_ticks = args.duration.as_millis() as u64 / 100 + 10;
    while start.elapsed() < args.duration && !interrupted() && ticks < max_ticks {
        ticks += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..600)));
        let now = Instant::now();
        // Due heals and restarts.
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut sched)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        sched = later;
        for (_, s) in due {
            match s {
                Sched::Heal(l, long_node) => {
                    if let Some(i) = long_node {
                        kept_blocks(cl, &cl.nodes[i]);
                    }
                    cl.link(&l, true);
                    down.remove(&l);
                }
                Sched::StartEtcd(i) => {
                    let _ = cl.etcd[i].start(&[]);
                }
                Sched::StartCtrl(i) => {
                    let _ = cl.ctrls[i].start(&[("COIL_LOG", "warn")]);
                }
            }
        }
        restart_on_own(cl, calm);
        removal = step_removal(cl, removal, &mut rng, calm);
        if last_sample.elapsed() > Duration::from_secs(3) {
            last_sample = Instant::now();
            sample(cl, &format!("at {}s", start.elapsed().as_secs()));
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            last_report = Instant::now();
            let c = &cl.c;
            println!(
                "  {:>4}s ops {} add ok/failed {}/{} kills {} partitions {} reboots {} removals {} readmits {}",
                start.elapsed().as_secs(),
                c.ops.load(Ordering::Relaxed),
                c.add_ok.load(Ordering::Relaxed),
                c.add_err.load(Ordering::Relaxed),
                kills(c),
                c.partitions.load(Ordering::Relaxed),
                c.reboots.load(Ordering::Relaxed),
                c.removals.load(Ordering::Relaxed),
                c.readmits.load(Ordering::Relaxed),
            );
        }
        if start.elapsed() > chaos_until {
            if !calm {
                calm = true;
                cl.note("calm tail: faults stop".into());
                calm_down(cl, &mut sched, &mut down);
            }
            continue;
        }
        let pick_node = |rng: &mut StdRng| -> Option<usize> {
            let i = rng.gen_range(0..NODES);
            (!cl.nodes[i].out.load(Ordering::SeqCst)).then_some(i)
        };
        let dice: f64 = rng.gen();
        if dice < 0.14 {
            // kill -9 coild at a random moment; a third of the restarts arm
            // the next failpoint.
            let Some(i) = pick_node(&mut rng) else {
                continue;
            };
            let n = &cl.nodes[i];
            let fp = rng.gen_bool(0.3).then(|| {
                k += 1;
                FAILPOINTS[k % FAILPOINTS.len()]
            });
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
            if n.coild.kill() {
                cl.c.coild_kills.fetch_add(1, Ordering::Relaxed);
            }
            if cl.start_coild(n, fp).is_err() {
                cl.ensure_coild(n);
            }
        } else if dice < 0.20 {
            let i = rng.gen_range(0..CONTROLLERS);
            let after = Duration::from_millis(rng.gen_range(200..2000));
            if cl.ctrls[i].kill() {
                cl.c.controller_kills.fetch_add(1, Ordering::Relaxed);
                sched.push((now + after, Sched::StartCtrl(i)));
            }
        } else if dice < 0.26 {
            let i = rng.gen_range(0..MEMBERS);
            let after = Duration::from_millis(rng.gen_range(500..3000));
            if cl.etcd[i].kill() {
                cl.c.etcd_kills.fetch_add(1, Ordering::Relaxed);
                sched.push((now + after, Sched::StartEtcd(i)));
            }
        } else if dice < 0.29 {
            // Two members: quorum lost until they come back.
            let a = rng.gen_range(0..MEMBERS);
            let b = (a + rng.gen_range(1..MEMBERS)) % MEMBERS;
            let after = Duration::from_millis(rng.gen_range(1000..4000));
            let mut killed = 0;
            for i in [a, b] {
                if cl.etcd[i].kill() {
                    killed += 1;
                    cl.c.etcd_kills.fetch_add(1, Ordering::Relaxed);
                    sched.push((now + after, Sched::StartEtcd(i)));
                }
            }
            if killed == 2 {
                cl.c.quorum_losses.fetch_add(1, Ordering::Relaxed);
            }
        } else if dice < 0.68 {
            if down.len() >= 3 {
                continue;
            }
            let long = rng.gen_bool(0.3);
            let dur = if long {
                Duration::from_millis(
                    rng.gen_range((TTL_S + GRACE_S) * 1000 + 1000..(TTL_S + GRACE_S) * 1000 + 3500),
                )
            } else {
                Duration::from_millis(rng.gen_range(300..3000))
            };
            let what: f64 = rng.gen();
            let mut long_node = None;
            let link = if what < 0.5 {
                let Some(i) = pick_node(&mut rng) else {
                    continue;
                };
                cl.c.node_partitions.fetch_add(1, Ordering::Relaxed);
                long_node = long.then_some(i);
                cl.nodes[i].link.clone()
            } else if what < 0.8 {
                cl.c.etcd_partitions.fetch_add(1, Ordering::Relaxed);
                cl.etcd_links[rng.gen_range(0..MEMBERS)].clone()
            } else {
                cl.c.leader_partitions.fetch_add(1, Ordering::Relaxed);
                let fallback = rng.gen_range(0..CONTROLLERS);
                cl.ctrl_links[cl.leader().unwrap_or(fallback)].clone()
            };
            if down.contains(&link) || !cl.link(&link, false) {
                continue;
            }
            cl.c.partitions.fetch_add(1, Ordering::Relaxed);
            if long {
                cl.c.long_partitions.fetch_add(1, Ordering::Relaxed);
            }
            down.insert(link.clone());
            sched.push((now + dur, Sched::Heal(link, long_node)));
        } else if dice < 0.73 {
            let Some(i) = pick_node(&mut rng) else {
                continue;
            };
            reboot(cl, &cl.nodes[i]);
        } else if dice < 0.76 && matches!(removal, Removal::None) {
            if let Some(i) = pick_node(&mut rng) {
                removal = power_off(cl, i);
            }
        }
    }
    if interrupted() {
        return;
    }
    // The loop ended: everything heals and restarts.
    calm_down(cl, &mut sched, &mut down);
    let deadline = Instant::now() + Duration::from_secs(90);
    while !matches!(removal, Removal::None) && Instant::now() < deadline && !interrupted() {
        std::thread::sleep(Duration::from_millis(300));
        removal = step_removal(cl, removal, &mut rng, true);
    }
    if !matches!(removal, Removal::None) {
        cl.violation("the removal scenario did not finish within 90 s after the chaos".into());
    }
}

fn kills(c: &Counters) -> u64 {
    c.coild_kills.load(Ordering::Relaxed)
        + c.failpoint_kills.load(Ordering::Relaxed)
        + c.controller_kills.load(Ordering::Relaxed)
        + c.etcd_kills.load(Ordering::Relaxed)
}

/// Heals every partition, starts every process, and restarts each coild
/// without a failpoint armed.
fn calm_down(cl: &Cluster, sched: &mut Vec<(Instant, Sched)>, down: &mut BTreeSet<String>) {
    for (_, s) in std::mem::take(sched) {
        if let Sched::Heal(_, Some(i)) = s {
            kept_blocks(cl, &cl.nodes[i]);
        }
    }
    for l in std::mem::take(down) {
        cl.link(&l, true);
    }
    for e in &cl.etcd {
        let _ = e.start(&[]);
    }
    for c in &cl.ctrls {
        let _ = c.start(&[("COIL_LOG", "warn")]);
    }
    for n in &cl.nodes {
        if n.out.load(Ordering::SeqCst) {
            continue;
        }
        use std::os::unix::process::ExitStatusExt;
        if let Some(st) = n.coild.reap() {
            if st.signal() == Some(libc::SIGABRT) {
                cl.c.failpoint_kills.fetch_add(1, Ordering::Relaxed);
            }
        }
        n.coild.kill();
        cl.ensure_coild(n);
    }
}

/// A node cut off longer than liveness TTL + grace, just before it is
/// reconnected: expiry alone frees nothing, so every block it publishes is
/// still leased to it; and the controller has noted it unreachable.
fn kept_blocks(cl: &Cluster, n: &CNode) {
    if n.out.load(Ordering::SeqCst) {
        return;
    }
    let table = cl.table119(n);
    let Some(owners) = cl.pool_leases() else {
        cl.note(format!(
            "{}: etcd did not answer to check its blocks after a long partition",
            n.name
        ));
        return;
    };
    for b in &table {
        if owners.get(b) != Some(&n.name) {
            cl.violation(format!(
                "{} was cut off longer than liveness TTL + grace and its block {b} (in its \
                 table 119) is now leased to {:?}",
                n.name,
                owners.get(b)
            ));
        }
    }
    let listed = cl
        .ctl_json(&["node", "list", "--json"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    if listed
        .iter()
        .any(|x| x["node"] == n.name.as_str() && !x["unreachable_since"].is_null())
    {
        cl.c.unreachable_noted.fetch_add(1, Ordering::Relaxed);
    }
    cl.c.long_node_partitions_checked
        .fetch_add(1, Ordering::Relaxed);
}

fn reboot(cl: &Cluster, n: &CNode) {
    cl.pause(n);
    n.coild.kill();
    if let Err(e) = cl.wipe(n) {
        cl.violation(e);
    }
    cl.c.reboots.fetch_add(1, Ordering::Relaxed);
    cl.ensure_coild(n);
    n.paused.store(false, Ordering::SeqCst);
}

/// The node loses power: coild dies with its pods and kernel state.
fn power_off(cl: &Cluster, i: usize) -> Removal {
    let n = &cl.nodes[i];
    n.out.store(true, Ordering::SeqCst);
    cl.pause(n);
    let mut old = cl.table119(n);
    n.coild.kill();
    if let Some(l) = cl.leased(&n.name) {
        old.extend(l);
    }
    if let Err(e) = cl.wipe(n) {
        cl.violation(e);
    }
    // The node's link stays up (a powered-off node does not answer
    // anything anyway); only its liveness lease has to expire.
    cl.link(&n.link, true);
    cl.note(format!("{} powered off, holding {old:?}", n.name));
    Removal::Off {
        node: i,
        since: Instant::now(),
        old,
    }
}

fn back_in(n: &CNode) {
    n.out.store(false, Ordering::SeqCst);
    n.paused.store(false, Ordering::SeqCst);
}

fn step_removal(cl: &Cluster, r: Removal, rng: &mut StdRng, hurry: bool) -> Removal {
    match r {
        Removal::None => Removal::None,
        Removal::Off { node, since, old } => {
            let n = &cl.nodes[node];
            let o = cl.ctl(&["node", "remove", &n.name]);
            if status_ok(&o) {
                cl.c.removals.fetch_add(1, Ordering::Relaxed);
                cl.note(format!(
                    "{} removed {:.1}s after power-off",
                    n.name,
                    since.elapsed().as_secs_f64()
                ));
                let wait = if hurry {
                    Duration::ZERO
                } else {
                    Duration::from_millis(rng.gen_range(2000..6000))
                };
                return Removal::Removed {
                    node,
                    until: Instant::now() + wait,
                    old,
                    boot: [Boot::WhenEtcdAnswers, Boot::Anyway, Boot::CutOff][rng.gen_range(0..3)],
                };
            }
            if since.elapsed() > Duration::from_secs(60) {
                cl.violation(format!(
                    "coilctl node remove {} refused for 60 s after its power-off: {}",
                    n.name,
                    describe(&o)
                ));
                // Power it on unremoved.
                cl.ensure_coild(n);
                back_in(n);
                return Removal::None;
            }
            Removal::Off { node, since, old }
        }
        Removal::Removed {
            node,
            until,
            old,
            boot,
        } => {
            let keep = || Removal::Removed {
                node,
                until,
                old: old.clone(),
                boot,
            };
            if Instant::now() < until {
                return keep();
            }
            let n = &cl.nodes[node];
            // Power comes back: a power cut is a reboot (wipe set the new
            // boot id). Whether etcd answers the admin at that moment says
            // whether coild could know it was removed.
            let etcd_up = status_ok(&cl.ctl(&["pool", "list"]));
            if matches!(boot, Boot::WhenEtcdAnswers)
                && !etcd_up
                && until.elapsed() < Duration::from_secs(20)
            {
                return keep();
            }
            let cut = matches!(boot, Boot::CutOff);
            if cut {
                cl.link(&n.link, false);
            }
            cl.ensure_coild(n);
            cl.note(format!(
                "{} powered on ({boot:?}), fenced (etcd answering the admin: {etcd_up})",
                n.name
            ));
            fenced_adds(
                cl,
                n,
                &old,
                &format!("{boot:?}, etcd answering the admin: {etcd_up}"),
            );
            if cut {
                cl.link(&n.link, true);
            }
            Removal::Fenced {
                node,
                old,
                up_since: None,
                deadline: Instant::now() + Duration::from_secs(30),
            }
        }
        Removal::Fenced {
            node,
            old,
            up_since,
            deadline,
        } => {
            let up = status_ok(&cl.ctl(&["pool", "list"]));
            let up_since = if up {
                up_since.or(Some(Instant::now()))
            } else {
                None
            };
            let settled = up_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(2200));
            if !settled && Instant::now() < deadline {
                return Removal::Fenced {
                    node,
                    old,
                    up_since,
                    deadline,
                };
            }
            let n = &cl.nodes[node];
            let table = cl.table119(n);
            let republished: Vec<&String> = table.intersection(&old).collect();
            if !republished.is_empty() {
                let owners = cl.pool_leases();
                cl.violation(format!(
                    "removed {} publishes its old blocks {republished:?} in table 119 (etcd \
                     answering for two resyncs: {settled}; leased now to: {})",
                    n.name,
                    match owners {
                        None => "etcd does not answer".to_string(),
                        Some(o) => format!(
                            "{:?}",
                            republished
                                .iter()
                                .map(|b| (b.to_string(), o.get(*b).cloned()))
                                .collect::<Vec<_>>()
                        ),
                    }
                ));
            }
            Removal::Readmit {
                node,
                deadline: Instant::now() + Duration::from_secs(60),
            }
        }
        Removal::Readmit { node, deadline } => {
            let n = &cl.nodes[node];
            let o = cl.ctl(&["node", "readmit", &n.name]);
            if status_ok(&o) {
                cl.note(format!("{} readmitted", n.name));
                return Removal::Readmitting {
                    node,
                    deadline: Instant::now() + Duration::from_secs(30),
                };
            }
            if Instant::now() > deadline || interrupted() {
                cl.violation(format!(
                    "coilctl node readmit {} kept failing for 60 s: {}",
                    n.name,
                    describe(&o)
                ));
                back_in(n);
                return Removal::None;
            }
            Removal::Readmit { node, deadline }
        }
        Removal::Readmitting { node, deadline } => {
            let n = &cl.nodes[node];
            let Some((cid, ns)) = new_pod(cl, n) else {
                return Removal::Readmitting { node, deadline };
            };
            let r = cni(cl, n, "ADD", &cid, Some(&ns));
            if let (0, Some(ip)) = (r.code, answered_ip(&r)) {
                cl.c.add_ok.fetch_add(1, Ordering::Relaxed);
                // Its block must be one etcd leases to it (unknown while
                // etcd does not answer).
                match cl.leased(&n.name) {
                    Some(l) if !l.iter().any(|b| block_contains(b, ip)) => cl.violation(format!(
                        "readmitted {} answered {ip}, in none of its leases {l:?}",
                        n.name
                    )),
                    Some(_) => {}
                    None => cl.note(format!(
                        "{}: etcd did not answer to check the lease of {ip}",
                        n.name
                    )),
                }
                let other = {
                    let mut m = cl.model.lock().expect("model");
                    let other = m.nodes.iter().enumerate().find_map(|(i, nm)| {
                        nm.live
                            .iter()
                            .find(|(_, (_, a))| *a == ip)
                            .map(|(c, _)| format!("{c} on node {i}"))
                    });
                    m.seen.insert(ip);
                    m.nodes[node].live.insert(cid.clone(), (ns, ip));
                    other
                };
                if let Some(other) = other {
                    cl.violation(format!(
                        "ADD of {cid} on readmitted {} answered {ip}, which {other} still holds",
                        n.name
                    ));
                }
                cl.c.readmits.fetch_add(1, Ordering::Relaxed);
                cl.note(format!("{} serves again ({ip})", n.name));
                back_in(n);
                return Removal::None;
            }
            cl.model.lock().expect("model").nodes[node]
                .to_del
                .push((cid, Some(ns)));
            if Instant::now() > deadline || interrupted() {
                cl.violation(format!(
                    "readmitted {} did not serve an ADD within 30 s (last: exit {} {})",
                    n.name, r.code, r.out
                ));
                back_in(n);
                return Removal::None;
            }
            Removal::Readmitting { node, deadline }
        }
    }
}

/// A removed node back up: every ADD refused with code 11.
fn fenced_adds(cl: &Cluster, n: &CNode, old: &BTreeSet<String>, how: &str) {
    for _ in 0..3 {
        let Some((cid, ns)) = new_pod(cl, n) else {
            continue;
        };
        let r = cni(cl, n, "ADD", &cid, Some(&ns));
        match (r.code, answered_ip(&r)) {
            (0, ip) => {
                let block = ip.and_then(|ip| old.iter().find(|b| block_contains(b, ip)));
                let owner = match (block, cl.pool_leases()) {
                    (None, _) => "-".to_string(),
                    (Some(_), None) => "etcd does not answer".to_string(),
                    (Some(b), Some(o)) => format!("{:?}", o.get(b)),
                };
                cl.violation(format!(
                    "removed {} answered ADD of {cid} with {ip:?} before readmit (its old block: \
                     {block:?}, leased now to: {owner}; power-on: {how}; \
                     see {})",
                    n.name,
                    n.coild.log.display()
                ));
            }
            _ if cni_code(&r) == Some(11) => {
                cl.c.fenced_refusals.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                check_error(cl, "fenced ADD", &r);
                cl.c.fenced_other_errors.fetch_add(1, Ordering::Relaxed);
                cl.note(format!(
                    "removed {} refused ADD with exit {} {}",
                    n.name, r.code, r.out
                ));
            }
        }
        cl.model.lock().expect("model").nodes[n.idx]
            .to_del
            .push((cid, Some(ns)));
    }
}

/// Drains every DEL backlog and repairs every node.
fn converge(cl: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(120);
    for n in &cl.nodes {
        loop {
            let item = cl.model.lock().expect("model").nodes[n.idx].to_del.pop();
            let Some(item) = item else { break };
            let r = cni(cl, n, "DEL", &item.0, item.1.as_deref());
            if r.code == 0 {
                if let Some(ns) = &item.1 {
                    let _ = sh_quiet(&["ip", "netns", "del", ns]);
                }
                continue;
            }
            check_error(cl, "DEL", &r);
            cl.model.lock().expect("model").nodes[n.idx]
                .to_del
                .push(item);
            if Instant::now() > deadline || interrupted() {
                cl.violation(format!("DELs on {} kept failing after the chaos", n.name));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let jdir = n.dir.join("journal").display().to_string();
        let sock = n.socket.display().to_string();
        let b = cl.bin("coilctl");
        let o = cl.in_ns(
            &n.ns,
            &[
                &b,
                "--etcd-endpoints",
                &cl.endpoints,
                "--journal-dir",
                &jdir,
                "--socket",
                &sock,
                "node",
                "repair",
            ],
        );
        if !status_ok(&o) {
            cl.violation(format!(
                "final node repair of {} failed: {}",
                n.name,
                describe(&o)
            ));
        }
    }
}

fn finish(cl: &Cluster, args: &Args, elapsed: Duration) -> i32 {
    // Tables and leases converge: disjoint, and each node's table 119 is
    // within its leases.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut problems = Vec::new();
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for n in &cl.nodes {
            let table = cl.table119(n);
            match cl.leased(&n.name) {
                None => problems.push(format!("etcd did not list {}'s leases", n.name)),
                Some(leased) => {
                    let extra: Vec<&String> = table.difference(&leased).collect();
                    if !extra.is_empty() {
                        problems.push(format!(
                            "{}'s table 119 has {extra:?}, not leased to it (leases {leased:?})",
                            n.name
                        ));
                    }
                }
            }
            for b in table {
                if let Some(o) = owner.insert(b.clone(), n.name.clone()) {
                    problems.push(format!("block {b} in the table 119 of {o} and {}", n.name));
                }
            }
        }
        if problems.is_empty() {
            break;
        }
        if Instant::now() > deadline || interrupted() {
            for p in problems {
                cl.violation(format!("after convergence: {p}"));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let pods_seen = sample(cl, "after convergence");
    // Every acknowledged ADD still wired.
    let live: Vec<(usize, String, String, IpAddr)> = {
        let m = cl.model.lock().expect("model");
        m.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, nm)| {
                nm.live
                    .iter()
                    .map(move |(c, (ns, ip))| (i, c.clone(), ns.clone(), *ip))
            })
            .collect()
    };
    let truth = pod_addresses(cl);
    for (i, cid, ns, ip) in &live {
        let n = &cl.nodes[*i];
        if !truth.get(ip).is_some_and(|p| p.contains(ns)) {
            cl.violation(format!(
                "{cid} on {}: ADD answered {ip} but its eth0 does not have it (holders: {:?})",
                n.name,
                truth.get(ip)
            ));
        }
        let route = stdout(&cl.in_ns(&n.ns, &["ip", "route", "show", &format!("{ip}/32")]));
        if !route.contains("dev coil") {
            cl.violation(format!(
                "{cid} on {}: no host route to {ip} ({route:?})",
                n.name
            ));
        }
    }
    // Delete every pod: nothing may leak anywhere.
    for (i, cid, ns, _) in &live {
        let r = cni(cl, &cl.nodes[*i], "DEL", cid, Some(ns));
        if r.code != 0 {
            cl.violation(format!("final DEL of {cid} failed: {}", r.out));
        }
        let _ = sh_quiet(&["ip", "netns", "del", ns]);
    }
    for nm in cl.model.lock().expect("model").nodes.iter_mut() {
        nm.live.clear();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut finals = Vec::new();
    loop {
        let mut problems = Vec::new();
        finals.clear();
        for n in &cl.nodes {
            let st = cl.stats(n);
            let links = cl.coil_links(n);
            let table = cl.table119(n);
            let leased = cl.leased(&n.name);
            if st["attachments"] != 0 {
                problems.push(format!("{}: {} attachments", n.name, st["attachments"]));
            }
            if !links.is_empty() {
                problems.push(format!("{}: coil veths left {links:?}", n.name));
            }
            if table.len() > MIN_BLOCKS {
                problems.push(format!("{}: table 119 {table:?}", n.name));
            }
            match &leased {
                Some(l) if l.len() > MIN_BLOCKS => {
                    problems.push(format!("{}: leases beyond --min-blocks {l:?}", n.name))
                }
                None => problems.push(format!("{}: etcd did not list its leases", n.name)),
                _ => {}
            }
            finals.push(json!({"node": n.name, "stats": st, "blocks": table.len()}));
        }
        match cl.pool_leases() {
            Some(all) if all.len() > NODES * MIN_BLOCKS => {
                problems.push(format!("pool default still leases {all:?}"))
            }
            None => problems.push("etcd did not show the pool".into()),
            _ => {}
        }
        if problems.is_empty() {
            break;
        }
        if Instant::now() > deadline || interrupted() {
            for p in problems {
                cl.violation(format!("after deleting every pod: {p}"));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let seen: Vec<IpAddr> = cl
        .model
        .lock()
        .expect("model")
        .seen
        .iter()
        .copied()
        .collect();
    let leftover = |cl: &Cluster, ips: &[IpAddr]| -> Vec<(IpAddr, Value)> {
        ips.iter()
            .filter_map(|ip| {
                let v = cl.ctl_json(&["address", "info", &ip.to_string(), "--json"])?;
                (!v["assignment"].is_null()).then(|| (*ip, v["assignment"].clone()))
            })
            .collect()
    };
    let mut left = leftover(cl, &seen);
    // The index is asynchronous (and the controller collects what no lease
    // backs): give it a few moments.
    for _ in 0..10 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
        let ips: Vec<IpAddr> = left.iter().map(|(ip, _)| *ip).collect();
        left = leftover(cl, &ips);
    }
    for (ip, a) in left {
        cl.violation(format!("address index still lists {ip}: {a}"));
    }
    let c = &cl.c;
    let violations = cl.model.lock().expect("model").violations.clone();
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let result = json!({
        "seed": args.seed,
        "wall_seconds": elapsed.as_secs(),
        "chaos_seconds": args.duration.as_secs(),
        "nodes": NODES,
        "ops": l(&c.ops),
        "add_ok": l(&c.add_ok),
        "add_failed": l(&c.add_err),
        "del_ok": l(&c.del_ok),
        "del_failed": l(&c.del_err),
        "retryable_errors": l(&c.retryable),
        "kills": kills(c),
        "coild_kills": l(&c.coild_kills),
        "failpoint_kills": l(&c.failpoint_kills),
        "controller_kills": l(&c.controller_kills),
        "etcd_kills": l(&c.etcd_kills),
        "quorum_losses": l(&c.quorum_losses),
        "partitions": l(&c.partitions),
        "long_partitions": l(&c.long_partitions),
        "node_partitions": l(&c.node_partitions),
        "etcd_partitions": l(&c.etcd_partitions),
        "leader_partitions": l(&c.leader_partitions),
        "reboots": l(&c.reboots),
        "removals": l(&c.removals),
        "fenced_refusals": l(&c.fenced_refusals),
        "fenced_other_errors": l(&c.fenced_other_errors),
        "readmits": l(&c.readmits),
        "restarts_on_own": l(&c.restarts_on_own),
        "long_node_partitions_checked": l(&c.long_node_partitions_checked),
        "unreachable_noted": l(&c.unreachable_noted),
        "samples": l(&c.samples),
        "addresses_checked": seen.len(),
        "pods_at_end": pods_seen,
        "violations": violations.len(),
        "final": finals,
    });
    println!();
    println!("chaos --cluster summary (seed {}):", args.seed);
    if let Some(o) = result.as_object() {
        for (k, v) in o {
            if k != "final" {
                println!("  {k:<29} {v}");
            }
        }
    }
    for v in &violations {
        println!("  violation: {v}");
    }
    if !violations.is_empty() {
        println!("  events before it:");
        for e in cl.log.lock().expect("log").iter() {
            println!("    {e}");
        }
        println!(
            "  reproduce with: chaos-tests/run --cluster --seed {} --duration {}",
            args.seed,
            args.duration.as_secs()
        );
        println!("  logs: {}", cl.dir.display());
    }
    println!("CHAOS_CLUSTER_RESULT {result}");
    let summary = args
        .summary
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench/summary.json"));
    let f = |k: &str| result[k].as_f64().unwrap_or(0.0);
    write_summary(
        &summary,
        &[
            ("chaos.cluster.ops", f("ops"), "operations"),
            ("chaos.cluster.kills", f("kills"), "kills"),
            ("chaos.cluster.partitions", f("partitions"), "partitions"),
            (
                "chaos.cluster.violations",
                violations.len() as f64,
                "violations",
            ),
        ],
    );
    if violations.is_empty() {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_contain_their_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        assert!(block_contains("10.197.0.8/29", ip("10.197.0.15")));
        assert!(!block_contains("10.197.0.8/29", ip("10.197.0.16")));
        assert!(block_contains("10.197.0.8/32", ip("10.197.0.8")));
        assert!(!block_contains("garbage", ip("10.197.0.8")));
    }
}
