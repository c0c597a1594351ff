//! (Shared by sim.rs, sim_planted.rs and driver.rs.)
//!
//! A seeded fault-injection run of coild's real driver, in-process and
//! without root: the daemon, its journal and the embedded store over the
//! in-memory kernel (`MemKernel`). A schedule drawn from the seed mixes
//! what kubelet and a runtime send (ADD, DEL, DEL twice, DEL without a
//! netns, CHECK, GC with a partial list) with what goes wrong around them
//! (a pod's netns deleted, a wire that fails, the store down and up again,
//! coild killed and restarted,
//! the node rebooted, a resync, and coild crashing inside a request at
//! one of its failpoints: the request unwinds there, before any later
//! effect, and the daemon's runtime is dropped), and the invariants are
//! checked after every step:
//!
//! 1. no address is on two live veths in the kernel;
//! 2. no address is in two attachments of the journal, and each lies in a
//!    block the journal leases;
//! 3. every pod whose ADD succeeded, and that was not deleted since (DEL,
//!    GC, its netns gone, a reboot), still holds exactly the addresses it
//!    was given, in the journal and on its interface;
//! 4. two live pods were never given the same address;
//! 5. table 119 holds only blocks the journal leases.
//!
//! The schedule replays from its seed (`COIL_SIM_SEED=N`, `COIL_SIM_STEPS=N`
//! run more); the daemon's own timing (its background teardown) is not
//! simulated, so a replay is the same schedule, not the same interleaving.
//! A failure prints the seed and the last steps.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use coil::cni::{parse_request, Response};
use coil::failpoint::{arm_in_process, take_fired, Crash};
use coil::journal::{Journal, LeaseState};
use coil::kernel::KernelOps;
use coil::kernel_mem::MemKernel;
use coil::store::backend::{Txn, TxnResult};
use coil::store::embedded::EmbeddedBackend;
use coil::store::{Backend, BackendError, BackendErrorKind};
use coil::store::{PoolSpec, Store};
use coil_cli::coild::{open_journal, Daemon, DaemonConfig, StoreChoice};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub type D = Daemon<Flaky, MemKernel>;

/// The embedded store behind a switch that makes every call fail as an
/// unreachable etcd would (`BackendErrorKind::Unavailable`): a store
/// outage at the Backend seam. Clones share the switch.
#[derive(Debug, Clone)]
pub struct Flaky {
    inner: Arc<EmbeddedBackend>,
    pub down: Arc<std::sync::atomic::AtomicBool>,
    /// The next transaction whose operation name contains this is applied,
    /// then answered as unavailable (a write whose answer was lost).
    pub lose_answer: Arc<std::sync::Mutex<Option<String>>>,
}

impl Flaky {
    fn check(&self, op: &str) -> Result<(), BackendError> {
        if self.down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(BackendError {
                kind: BackendErrorKind::Unavailable,
                op: op.to_string(),
                key: "-".into(),
                endpoint: "simulated store".into(),
                message: "the store is down (simulated outage)".into(),
            });
        }
        Ok(())
    }
}

impl Backend for Flaky {
    async fn txn(&self, op: &str, txn: Txn) -> Result<TxnResult, BackendError> {
        self.check(op)?;
        let lose = {
            let mut l = self.lose_answer.lock().unwrap_or_else(|e| e.into_inner());
            let hit = l.as_deref().is_some_and(|w| op.contains(w));
            if hit {
                *l = None;
            }
            hit
        };
        let r = self.inner.txn(op, txn).await;
        if lose {
            return Err(BackendError {
                kind: BackendErrorKind::Unavailable,
                op: op.to_string(),
                key: "-".into(),
                endpoint: "simulated store".into(),
                message: "applied, but the answer was lost (simulated timeout)".into(),
            });
        }
        r
    }
    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, BackendError> {
        self.check("lease grant")?;
        self.inner.lease_grant(ttl_secs).await
    }
    async fn lease_keep_alive(&self, id: i64) -> Result<i64, BackendError> {
        self.check("lease keep-alive")?;
        self.inner.lease_keep_alive(id).await
    }
    async fn lease_revoke(&self, id: i64) -> Result<(), BackendError> {
        self.check("lease revoke")?;
        self.inner.lease_revoke(id).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn requests(&self) -> u64 {
        self.inner.requests()
    }
}

/// coild's configuration for an in-process run in `dir`: the embedded
/// store, and no background resync (a test runs recovery when it means
/// to).
pub fn inproc_config(dir: &std::path::Path, node: &str) -> DaemonConfig {
    let p = |f: &str| dir.join(f);
    DaemonConfig {
        node_name: node.into(),
        store: StoreChoice::Embedded,
        table_id: 119,
        protocol_id: 30,
        mtu: 1500,
        socket: p("coild.sock"),
        journal_dir: p("journal"),
        boot_id_file: p("boot_id"),
        liveness_ttl: Duration::from_secs(30),
        pool_cache_ttl: Duration::from_secs(10),
        resync_interval: Duration::from_secs(3600),
        min_blocks: 1,
        metrics_addr: None,
        events: coil_cli::kube::EventSink::disabled(),
        // The in-process fault schedule crashes the direct engine inside
        // its requests (failpoints armed in-process); engine.rs runs the
        // machine engine in-process.
        engine: coil_cli::coild::EngineChoice::Direct,
    }
}

/// Starts coild in-process over `kernel`, in a runtime of its own, as
/// coild's `run` does (journal opened and verified, embedded store),
/// creating `pool` first when given.
pub fn start_inproc(
    cfg: DaemonConfig,
    kernel: MemKernel,
    pool: Option<PoolSpec>,
) -> Result<(tokio::runtime::Runtime, Arc<D>, Arc<Journal>), String> {
    start_inproc_with(cfg, kernel, pool, Arc::default(), None)
}

/// [`start_inproc`] with the store's outage switch (`down`), and the
/// store's block choice seeded with `seed` when given.
pub fn start_inproc_with(
    cfg: DaemonConfig,
    kernel: MemKernel,
    pool: Option<PoolSpec>,
    down: Arc<std::sync::atomic::AtomicBool>,
    seed: Option<u64>,
) -> Result<(tokio::runtime::Runtime, Arc<D>, Arc<Journal>), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let started = rt.block_on(async move {
        let journal = Arc::new(open_journal(&cfg.journal_dir).map_err(|e| e.msg)?);
        let backend = Flaky {
            inner: Arc::new(EmbeddedBackend::open(journal.clone()).map_err(|e| e.to_string())?),
            down: down.clone(),
            lose_answer: Arc::default(),
        };
        let mut store = Store::open_lazy(backend, "/coil/").map_err(|e| e.to_string())?;
        if let Some(seed) = seed {
            store = store.with_seed(seed);
        }
        if let Some(spec) = pool {
            store.create_pool(&spec).await.map_err(|e| e.to_string())?;
        }
        let d = Daemon::start_with(cfg, journal.clone(), store, kernel)
            .await
            .map_err(|e| e.msg)?;
        Ok::<_, String>((d, journal))
    });
    started.map(|(d, j)| (rt, d, j))
}

/// Failpoints a request reaches, with the request that reaches them.
const REQUEST_FAILPOINTS: [(&str, &str); 6] = [
    ("add.reserved", "ADD"),
    ("add.wired", "ADD"),
    ("add.recorded", "ADD"),
    ("acquire.intent", "ADD"),
    ("acquire.leased", "ADD"),
    ("del.releasing", "DEL"),
];

/// An in-process failpoint's panic is a simulated crash, not a test
/// failure: keep it out of the output.
fn quiet_crashes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Crash>().is_none() {
                default(info);
            }
        }));
    });
}

struct Coild {
    rt: tokio::runtime::Runtime,
    d: Arc<D>,
    journal: Arc<Journal>,
}

struct Sim {
    dir: tempfile::TempDir,
    kernel: MemKernel,
    coild: Option<Coild>,
    boot: u32,
    /// Live pods: container id -> (netns, the addresses ADD answered).
    live: BTreeMap<String, (String, Vec<IpAddr>)>,
    /// Pods whose netns exists but which are not live (failed ADD, DEL'd).
    idle: BTreeMap<String, String>,
    next: u32,
    trace: VecDeque<String>,
    seed: u64,
    steps: u64,
    /// The schedule index of the step being run (steps may be left out).
    index: u64,
    /// The replay command's knobs for this run.
    replay: String,
    /// How many trace lines to keep (all of a reduced schedule's).
    trace_cap: usize,
    /// coild starts so far (each seeds the store's generator anew).
    starts: u32,
    /// Crashes at failpoints inside requests and resyncs.
    crashes: u64,
    /// The simulated store outage switch (kept across restarts).
    store_down: Arc<std::sync::atomic::AtomicBool>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let s = Sim {
            // On tmpfs when there is one: the schedule checks logic, not
            // the disk (power cuts are cli/tests/powerloss.rs's), and an
            // fsync there costs nothing.
            dir: tempfile::tempdir_in("/dev/shm")
                .or_else(|_| tempfile::tempdir())
                .expect("tempdir"),
            kernel: MemKernel::default(),
            coild: None,
            boot: 1,
            live: BTreeMap::new(),
            idle: BTreeMap::new(),
            next: 0,
            trace: VecDeque::new(),
            seed,
            steps: 0,
            index: 0,
            replay: format!("COIL_SIM_SEED={seed}"),
            trace_cap: 40,
            starts: 0,
            crashes: 0,
            store_down: Arc::default(),
        };
        s.write_boot();
        s
    }

    fn write_boot(&self) {
        std::fs::write(
            self.dir.path().join("boot_id"),
            format!("boot-{}\n", self.boot),
        )
        .expect("boot id");
    }

    fn note(&mut self, s: String) {
        if self.trace.len() == self.trace_cap {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("step {}: {s}", self.index));
    }

    fn fail(&self, why: String) -> ! {
        let trace: Vec<&String> = self.trace.iter().collect();
        panic!(
            "seed {} step {}: {why}\nreplay: {} COIL_SIM_STEPS={} cargo test -p coil-cli --test sim\nlast steps:\n{}",
            self.seed,
            self.index,
            self.replay,
            self.index + 1,
            trace
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    fn start(&mut self, first: bool) {
        self.starts += 1;
        // IPv4: 8 blocks of 4; IPv6: 4 blocks of 2, so IPv6 runs out first
        // and blocks come and go.
        let pool = first.then(|| PoolSpec {
            name: "default".into(),
            subnets: vec![
                "10.50.0.0/27".parse().expect("net"),
                "fd00:50::/125".parse().expect("net"),
            ],
            block_size: 2,
            ipv6_block_size: Some(1),
        });
        // The pool is created with the store up.
        if first {
            self.store_down
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        match start_inproc_with(
            inproc_config(self.dir.path(), "sim-node"),
            self.kernel.clone(),
            pool,
            self.store_down.clone(),
            // Each start draws anew, as a restarted process would, but
            // from the seed: a replay picks the same blocks.
            Some(self.seed ^ u64::from(self.starts).wrapping_mul(0x2545_F491_4F6C_DD1D)),
        ) {
            Ok((rt, d, journal)) => self.coild = Some(Coild { rt, d, journal }),
            Err(e) => self.fail(format!("coild did not start: {e}")),
        }
    }

    fn kill(&mut self) {
        if let Some(c) = self.coild.take() {
            let Coild { rt, d, journal } = c;
            drop(d);
            drop(journal);
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }

    /// [`Sim::call`] with a failpoint armed: Err(name) when coild crashed
    /// there (the caller then kills it).
    fn call_armed(
        &self,
        fp: &str,
        cmd: &str,
        cid: &str,
        netns: Option<&str>,
    ) -> Result<Response, String> {
        arm_in_process(fp);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.call(cmd, cid, netns, "")
        }));
        let fired = take_fired();
        match (r, fired) {
            (Ok(resp), None) => Ok(resp),
            (_, Some(name)) => Err(name),
            (Err(p), None) => std::panic::resume_unwind(p),
        }
    }

    fn call(&self, cmd: &str, cid: &str, netns: Option<&str>, extra: &str) -> Response {
        let c = self.coild.as_ref().expect("running");
        let mut env: Vec<(&str, String)> = vec![
            ("CNI_COMMAND", cmd.into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_PATH", "/opt/cni/bin".into()),
        ];
        if !cid.is_empty() {
            env.push(("CNI_CONTAINERID", cid.into()));
        }
        if let Some(n) = netns {
            env.push(("CNI_NETNS", n.into()));
        }
        let conf = format!(r#"{{"cniVersion":"1.1.0","name":"k8s","type":"coil"{extra}}}"#);
        let req = parse_request(
            |k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
            conf.as_bytes(),
        )
        .expect("request");
        let d = c.d.clone();
        c.rt.block_on(async move { d.handle(req).await })
    }

    fn new_pod(&mut self) -> (String, String) {
        self.next += 1;
        let cid = format!("p{}", self.next);
        let netns = format!("/run/netns/{cid}");
        self.kernel.add_netns(&netns);
        (cid, netns)
    }

    fn pick<'a>(rng: &mut StdRng, keys: impl Iterator<Item = &'a String>) -> Option<String> {
        let v: Vec<&String> = keys.collect();
        if v.is_empty() {
            None
        } else {
            Some(v[rng.gen_range(0..v.len())].clone())
        }
    }

    fn step(&mut self, rng: &mut StdRng) {
        self.steps += 1;
        if self.coild.is_none() {
            self.note("start coild".into());
            self.start(false);
            self.check();
            return;
        }
        let roll = rng.gen_range(0..100);
        match roll {
            0..=34 => {
                let (cid, netns) = match Self::pick(rng, self.idle.keys()) {
                    Some(cid) if rng.gen_bool(0.3) => {
                        let n = self.idle.remove(&cid).unwrap_or_default();
                        (cid, n)
                    }
                    _ => self.new_pod(),
                };
                let r = self.call("ADD", &cid, Some(&netns), "");
                if r.ok {
                    let ips = answer_ips(&r);
                    self.note(format!("ADD {cid} -> {ips:?}"));
                    for (other, (_, held)) in &self.live {
                        if let Some(a) = ips.iter().find(|a| held.contains(a)) {
                            self.fail(format!("ADD {cid} answered {a}, which {other} holds"));
                        }
                    }
                    let v4 = ips.iter().filter(|a| a.is_ipv4()).count();
                    let v6 = ips.iter().filter(|a| a.is_ipv6()).count();
                    if (v4, v6) != (1, 1) {
                        self.fail(format!("ADD {cid} answered {ips:?} from a dual-stack pool"));
                    }
                    self.live.insert(cid, (netns, ips));
                } else {
                    self.note(format!("ADD {cid} failed: {}", r.stdout["msg"]));
                    // The runtime DELs after a failed ADD.
                    let _ = self.call("DEL", &cid, Some(&netns), "");
                    self.idle.insert(cid, netns);
                }
            }
            35..=54 => {
                if let Some(cid) = Self::pick(rng, self.live.keys()) {
                    let (netns, _) = self.live.remove(&cid).unwrap_or_default();
                    let twice = rng.gen_bool(0.2);
                    let without = rng.gen_bool(0.2);
                    let r = self.call("DEL", &cid, (!without).then_some(netns.as_str()), "");
                    self.note(format!("DEL {cid} (netns given: {})", !without));
                    if !r.ok {
                        self.fail(format!("DEL {cid} failed: {}", r.stdout));
                    }
                    if twice && !self.call("DEL", &cid, Some(&netns), "").ok {
                        self.fail(format!("second DEL of {cid} failed"));
                    }
                    self.idle.insert(cid, netns);
                }
            }
            55..=59 => {
                let cid = format!("never{}", rng.gen_range(0..5));
                self.note(format!("DEL unknown {cid}"));
                if !self.call("DEL", &cid, None, "").ok {
                    self.fail(format!("DEL of unknown {cid} failed"));
                }
            }
            60..=68 => {
                if let Some(cid) = Self::pick(rng, self.live.keys()) {
                    let netns = self.live[&cid].0.clone();
                    let r = self.call("CHECK", &cid, Some(&netns), "");
                    self.note(format!("CHECK {cid}"));
                    if !r.ok {
                        self.fail(format!("CHECK of live {cid}: {}", r.stdout));
                    }
                }
            }
            69..=71 => {
                // GC listing all live pods but one.
                let mut keep: Vec<String> = self.live.keys().cloned().collect();
                let dropped = if keep.is_empty() {
                    None
                } else {
                    Some(keep.remove(rng.gen_range(0..keep.len())))
                };
                let list: Vec<String> = keep
                    .iter()
                    .map(|c| format!(r#"{{"containerID":"{c}","ifname":"eth0"}}"#))
                    .collect();
                let extra = format!(r#","cni.dev/valid-attachments":[{}]"#, list.join(","));
                self.note(format!("GC dropping {dropped:?}"));
                let r = self.call("GC", "", None, &extra);
                if !r.ok {
                    self.fail(format!("GC failed: {}", r.stdout));
                }
                if let Some(d) = dropped {
                    if let Some((n, _)) = self.live.remove(&d) {
                        self.idle.insert(d, n);
                    }
                }
            }
            72..=76 => {
                if let Some(cid) = Self::pick(rng, self.live.keys()) {
                    let (netns, _) = self.live.remove(&cid).unwrap_or_default();
                    self.note(format!("netns of {cid} deleted"));
                    self.kernel.remove_netns(&netns);
                }
            }
            77..=78 => {
                self.note("next wire fails".into());
                self.kernel.fail_next_wires(1);
            }
            79 => {
                let down = !self.store_down.load(std::sync::atomic::Ordering::Relaxed);
                self.note(format!("store {}", if down { "down" } else { "up" }));
                self.store_down
                    .store(down, std::sync::atomic::Ordering::Relaxed);
            }
            80..=84 => {
                let (fp, cmd) = REQUEST_FAILPOINTS[rng.gen_range(0..REQUEST_FAILPOINTS.len())];
                let target = if cmd == "DEL" {
                    Self::pick(rng, self.live.keys()).map(|cid| {
                        let (n, _) = self.live.remove(&cid).unwrap_or_default();
                        (cid, n)
                    })
                } else {
                    None
                };
                let (cid, netns, cmd) = match target {
                    Some((cid, n)) => (cid, n, "DEL"),
                    None => {
                        let (cid, n) = self.new_pod();
                        (cid, n, "ADD")
                    }
                };
                match self.call_armed(fp, cmd, &cid, Some(&netns)) {
                    Ok(r) if cmd == "ADD" && r.ok => {
                        self.note(format!("ADD {cid} with {fp} armed (not reached)"));
                        let ips = answer_ips(&r);
                        for (other, (_, held)) in &self.live {
                            if let Some(a) = ips.iter().find(|a| held.contains(a)) {
                                self.fail(format!("ADD {cid} answered {a}, which {other} holds"));
                            }
                        }
                        self.live.insert(cid, (netns, ips));
                    }
                    Ok(r) => {
                        self.note(format!(
                            "{cmd} {cid} with {fp} armed (not reached): ok={}",
                            r.ok
                        ));
                        if cmd == "DEL" && !r.ok {
                            self.fail(format!("DEL {cid} failed: {}", r.stdout));
                        }
                        if cmd == "ADD" {
                            let _ = self.call("DEL", &cid, Some(&netns), "");
                        }
                        self.idle.insert(cid, netns);
                    }
                    Err(name) => {
                        self.note(format!("coild crashed at {name} during {cmd} {cid}"));
                        self.crashes += 1;
                        self.kill();
                        self.start(false);
                        self.check();
                        // The runtime DELs the failed ADD, or retries the DEL.
                        let r = self.call("DEL", &cid, Some(&netns), "");
                        if !r.ok {
                            self.fail(format!("DEL {cid} after the crash failed: {}", r.stdout));
                        }
                        self.idle.insert(cid, netns);
                    }
                }
            }
            85..=90 => {
                self.note("kill coild".into());
                self.kill();
                return;
            }
            91..=92 => {
                self.note("reboot".into());
                self.kill();
                self.kernel.reboot();
                self.boot += 1;
                self.write_boot();
                self.live.clear();
                self.idle.clear();
                return;
            }
            _ => {
                let fp = ["recovery.step", "recovery.applied", "none"][rng.gen_range(0..3)];
                self.note(format!("resync ({fp} armed)"));
                let c = self.coild.as_ref().expect("running");
                let d = c.d.clone();
                if fp != "none" {
                    arm_in_process(fp);
                }
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    c.rt.block_on(async move { d.recover(false, true, true).await })
                }));
                let fired = take_fired();
                match (r, fired) {
                    (_, Some(name)) => {
                        self.note(format!("coild crashed at {name} during a resync"));
                        self.crashes += 1;
                        self.kill();
                        return;
                    }
                    (Err(p), None) => std::panic::resume_unwind(p),
                    (Ok(_), None) => {}
                }
            }
        }
        self.check();
    }

    fn check(&self) {
        let Some(c) = self.coild.as_ref() else {
            return;
        };
        // 1. The kernel.
        let mut seen: BTreeMap<IpAddr, String> = BTreeMap::new();
        for (a, veth) in self.kernel.wired_addresses() {
            if let Some(o) = seen.insert(a, veth.clone()) {
                self.fail(format!("{a} is on two live veths: {o} and {veth}"));
            }
        }
        // 2. The journal.
        let leases = c.journal.leases().expect("leases");
        let leased: Vec<ipnet::IpNet> = leases
            .iter()
            .filter(|l| l.state != LeaseState::Releasing)
            .map(|l| l.block)
            .collect();
        let atts = c.journal.attachments().expect("attachments");
        let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
        for a in &atts {
            for x in &a.addresses {
                if let Some(o) = owner.insert(x.addr, a.key.to_string()) {
                    self.fail(format!(
                        "{} is in two attachments: {o} and {}",
                        x.addr, a.key
                    ));
                }
                if !leases.iter().any(|l| l.block.contains(&x.addr)) {
                    self.fail(format!("{} of {} lies in no leased block", x.addr, a.key));
                }
            }
        }
        // 3. Every live pod keeps what it was given.
        for (cid, (netns, ips)) in &self.live {
            let Some(a) = atts.iter().find(|a| a.key.container_id == *cid) else {
                self.fail(format!("live pod {cid} has no attachment"));
            };
            let mut have: Vec<IpAddr> = a.addresses.iter().map(|x| x.addr).collect();
            let mut want = ips.clone();
            have.sort();
            want.sort();
            if have != want {
                self.fail(format!(
                    "live pod {cid} was given {want:?}, the journal says {have:?}"
                ));
            }
            let mut on = self.kernel.pod_addresses(netns, "eth0").unwrap_or_default();
            on.sort();
            if on != want {
                self.fail(format!(
                    "live pod {cid} was given {want:?}, its eth0 has {on:?}"
                ));
            }
        }
        // 5. Table 119.
        let exported =
            c.rt.block_on(self.kernel.exported_blocks())
                .expect("exported");
        let unknown: BTreeSet<_> = exported.iter().filter(|b| !leased.contains(b)).collect();
        if !unknown.is_empty() {
            self.fail(format!(
                "table 119 holds {unknown:?}, which the journal does not lease"
            ));
        }
    }
}

/// The addresses of a CNI answer, in order.
pub fn answer_ips(r: &Response) -> Vec<IpAddr> {
    r.stdout["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["address"].as_str())
                .filter_map(|s| s.split('/').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `steps` steps of the schedule drawn from `seed`; returns the steps
/// taken and how many times coild was killed, crashed at a failpoint or
/// the node rebooted. Panics
/// with the seed, a replay command and the last steps on a violation.
pub fn run(seed: u64, steps: u64) -> (u64, u64) {
    run_only(seed, steps, None)
}

/// Step `i` of `seed`'s schedule draws from a generator of its own, so
/// leaving steps out changes nothing in what the others draw: a shorter
/// schedule of the same seed is still a schedule (the reducer's premise).
fn step_rng(seed: u64, i: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// [`run`] with only the schedule's steps in `only` (all when None).
pub fn run_only(seed: u64, steps: u64, only: Option<&BTreeSet<u64>>) -> (u64, u64) {
    quiet_crashes();
    let mut sim = Sim::new(seed);
    if let Some(o) = only {
        let list: Vec<String> = o.iter().map(|i| i.to_string()).collect();
        sim.replay = format!("COIL_SIM_SEED={seed} COIL_SIM_ONLY={}", list.join(","));
        sim.trace_cap = o.len().max(40);
    }
    sim.start(true);
    let mut kills = 0;
    for i in 0..steps {
        if only.is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        sim.index = i;
        let was_running = sim.coild.is_some();
        sim.step(&mut step_rng(seed, i));
        if was_running && sim.coild.is_none() {
            kills += 1;
        }
    }
    sim.kill();
    (sim.steps, kills + sim.crashes)
}

/// The message of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// The schedule index a violation message names ("seed S step N: ...").
fn failing_index(msg: &str) -> Option<u64> {
    let rest = msg.split(" step ").nth(1)?;
    rest.split(':').next()?.trim().parse().ok()
}

/// Shrinks the failing schedule of `seed` (at most `steps` steps): cuts
/// everything after the failing step, then leaves out chunks of steps
/// (halves, quarters, ... single steps, as delta debugging does) while
/// the run still fails in a way `same` accepts, for at most `budget`.
/// Returns the steps kept and the last failure's message; None if the
/// schedule does not fail.
pub fn reduce(
    seed: u64,
    steps: u64,
    same: impl Fn(&str) -> bool,
    budget: Duration,
) -> Option<(Vec<u64>, String)> {
    let t = std::time::Instant::now();
    let fails = |keep: Option<&[u64]>| -> Option<String> {
        let set: Option<BTreeSet<u64>> = keep.map(|k| k.iter().copied().collect());
        match std::panic::catch_unwind(|| run_only(seed, steps, set.as_ref())) {
            Ok(_) => None,
            Err(p) => Some(panic_message(p.as_ref())).filter(|m| same(m)),
        }
    };
    let all: Vec<u64> = (0..steps).collect();
    let mut last = fails(None)?;
    let mut keep: Vec<u64> = match failing_index(&last) {
        Some(i) => (0..=i.min(steps.saturating_sub(1))).collect(),
        None => all,
    };
    let mut n = 2usize;
    while keep.len() > 1 && t.elapsed() < budget {
        let chunk = keep.len().div_ceil(n);
        let mut cut = false;
        let mut start = 0;
        while start < keep.len() && t.elapsed() < budget {
            let candidate: Vec<u64> = keep[..start]
                .iter()
                .chain(keep[(start + chunk).min(keep.len())..].iter())
                .copied()
                .collect();
            if let Some(m) = fails(Some(&candidate)) {
                // Whatever follows the new failing step is not needed.
                keep = match failing_index(&m) {
                    Some(i) => candidate.into_iter().filter(|&s| s <= i).collect(),
                    None => candidate,
                };
                last = m;
                n = (n - 1).max(2);
                cut = true;
                break;
            }
            start += chunk;
        }
        if !cut {
            if chunk == 1 {
                break;
            }
            n = (n * 2).min(keep.len());
        }
    }
    Some((keep, last))
}
