//! coild's driver: turns CNI requests into journaled, idempotent effects.
//!
//! The order of every operation is fixed: the intent and the new records
//! are made durable in the journal first, then the store or the kernel is
//! changed (create-or-verify, so a replay is harmless), then the journal
//! records the outcome. The in-memory [`NodeState`] is a cache of the
//! journal, changed under a short std mutex that is never held across an
//! await, an fsync, a netlink call or a store call.

mod add;
mod blocks;
mod engine;
mod index;
mod release;
mod tasks;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coil::cni::{
    self, code, AddResult, CniError, Command, Interface, IpConfig, Request, Response, Route,
};
use coil::errors::ErrorKind;
use coil::journal::{
    AddressEntry, AssignedAddress, Attachment, AttachmentKey, AttachmentState, Batch, BlockLease,
    Intent, IntentOp, IntentState, Journal, JournalError, LeaseState, NodeMeta,
};
use coil::kernel::{gateway_for, KernelError, KernelOps, WireSpec};
use coil::node::{host_veth_name, NodeState, Reservation};
use coil::store::embedded::EmbeddedBackend;
use coil::store::{AddressRecord, Backend, Family, NodeRecord, Store, StoreError};
use coil_adapters::etcd::{EtcdBackend, EtcdOptions};
use coil_adapters::kernel::Kernel;
use coil_adapters::AnyBackend;
use ipnet::IpNet;
use tokio::sync::mpsc;

/// Which cluster store coild uses.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    Etcd { opts: EtcdOptions, prefix: String },
    Embedded,
}

/// What makes coild's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// The request handlers decide in async code (`daemon/add.rs`,
    /// `release.rs`, `blocks.rs`): the engine coild had before the node
    /// machine, kept as a fallback (`--engine direct`).
    Direct,
    /// The I/O-free node machine decides and coild drives it
    /// (`daemon/engine.rs`): persist, then act, then answer.
    #[default]
    Machine,
}

/// coild's resolved configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub node_name: String,
    pub store: StoreChoice,
    pub table_id: u32,
    pub protocol_id: u8,
    pub mtu: u32,
    pub socket: PathBuf,
    pub journal_dir: PathBuf,
    pub boot_id_file: PathBuf,
    pub liveness_ttl: Duration,
    pub pool_cache_ttl: Duration,
    /// How often coild re-runs recovery (table 119, host routes, leases).
    pub resync_interval: Duration,
    /// Blocks a node keeps even when empty.
    pub min_blocks: usize,
    /// Serve Prometheus metrics here (opt-in).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Kubernetes Events on this node's Node (disabled without an API).
    pub events: crate::kube::EventSink,
    /// Which engine decides.
    pub engine: EngineChoice,
}

/// Why coild could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct FatalError {
    pub msg: String,
    pub code: i32,
}

impl FatalError {
    pub fn exit_code(&self) -> i32 {
        self.code
    }

    fn new(code: i32, msg: impl Into<String>) -> FatalError {
        FatalError {
            msg: msg.into(),
            code,
        }
    }
}

/// Why a request failed; mapped to a CNI code in [`DaemonError::to_cni`],
/// the one place coil errors become CNI codes.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Check(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Internal(String),
    /// A refusal decided by the node machine, of its kind.
    #[error("{1}")]
    Machine(ErrorKind, String),
}

impl DaemonError {
    /// What kind of failure this is (see [`coil::errors`], the one table
    /// of CNI and exit codes).
    pub fn kind(&self) -> ErrorKind {
        match self {
            DaemonError::Kernel(KernelError::NetnsMissing(_)) => ErrorKind::NetnsMissing,
            DaemonError::Kernel(KernelError::BadNetns(_)) => ErrorKind::BadEnv,
            DaemonError::Kernel(KernelError::Timeout(..)) => ErrorKind::TryAgain,
            DaemonError::Kernel(KernelError::InterfaceExists { .. }) => ErrorKind::InterfaceExists,
            DaemonError::Kernel(_) => ErrorKind::Kernel,
            DaemonError::Store(e) => e.kind(),
            DaemonError::Journal(JournalError::Poisoned { .. }) => ErrorKind::TryAgain,
            DaemonError::Journal(_) => ErrorKind::Journal,
            DaemonError::Busy(_) => ErrorKind::TryAgain,
            DaemonError::Check(_) => ErrorKind::CheckFailed,
            DaemonError::Config(_) => ErrorKind::BadInput,
            DaemonError::Internal(_) => ErrorKind::Internal,
            DaemonError::Machine(k, _) => *k,
        }
    }

    pub fn to_cni(&self) -> CniError {
        let c = self.kind().cni_code();
        let msg = match self {
            DaemonError::Store(StoreError::PoolNotFound(p)) => format!(
                "pool {p} does not exist; create it with `coilctl pool create {p} SUBNET --block-size N`"
            ),
            other => other.to_string(),
        };
        CniError::new(c, msg)
    }
}

type DResult<T> = Result<T, DaemonError>;

/// Address index updates waiting for the mirror task.
const MIRROR_QUEUE: usize = 4096;
/// Released attachments waiting for their batched veth teardown.
const TEARDOWN_QUEUE: usize = 1024;
/// Namespaces whose pool existence is cached (callers choose namespaces,
/// so the cache is bounded).
const POOL_CACHE_MAX: usize = 1024;

/// A cached pool: its families (None: there is no such pool), and when
/// the store said so.
type PoolShape = (Option<Vec<Family>>, Instant);

/// Longest a kernel operation of a request may take (wiring a pod takes
/// about a millisecond; the bound is for a kernel stuck on the rtnl lock or
/// a netns path on a hung mount).
const KERNEL_DEADLINE: Duration = Duration::from_secs(15);

/// Runs a kernel operation within [`KERNEL_DEADLINE`].
async fn deadline<T>(
    what: impl Into<String>,
    f: impl std::future::Future<Output = Result<T, KernelError>>,
) -> Result<T, KernelError> {
    match tokio::time::timeout(KERNEL_DEADLINE, f).await {
        Ok(r) => r,
        Err(_) => Err(KernelError::Timeout(what.into(), KERNEL_DEADLINE)),
    }
}

#[derive(Debug, Default)]
struct Latencies {
    add: crate::metrics::Histogram,
    del: crate::metrics::Histogram,
    commit: crate::metrics::Histogram,
}

/// Address index updates, applied asynchronously (the journal is the
/// authority; the index is a mirror for coilctl and the controller).
#[derive(Debug)]
enum Mirror {
    Put(AddressRecord),
    Delete(AddressRecord),
}

/// The node daemon.
pub struct Daemon<B: Backend, K: KernelOps = Kernel> {
    cfg: DaemonConfig,
    journal: Arc<Journal>,
    store: Store<B>,
    kernel: K,
    boot_id: String,
    state: Mutex<NodeState>,
    pool_locks: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pools by name: their families (None: no such pool), and when read.
    pool_cache: Mutex<HashMap<String, PoolShape>>,
    mirror: mpsc::Sender<Mirror>,
    /// Index updates dropped because the mirror queue was full.
    mirror_dropped: AtomicU64,
    /// Address index entries repaired by `reconcile_index`.
    index_repairs: AtomicU64,
    /// DEL's batched veth teardown (see `teardown_task`).
    teardown: mpsc::Sender<(Attachment, u64)>,
    /// Requests being handled, and when the last one came (ms since
    /// `epoch`): the teardown runs when requests pause.
    inflight: std::sync::atomic::AtomicUsize,
    last_request_ms: AtomicU64,
    epoch: Instant,
    store_ok: AtomicBool,
    /// Store calls made on the ADD path (pool lookups, block leases): the
    /// figure the "zero etcd requests per ADD" target is about.
    add_store_calls: AtomicU64,
    /// Requests hold it shared; recovery holds it exclusively, so a plan
    /// never races an ADD or a DEL in flight.
    gate: tokio::sync::RwLock<()>,
    /// Blocks seen empty, and how many resyncs in a row.
    idle: Mutex<HashMap<IpNet, u32>>,
    /// Latency histograms.
    m: Latencies,
    /// Counters for stats and metrics.
    lease_losses: AtomicU64,
    recovery_actions: AtomicU64,
    /// Socket requests refused as malformed.
    rejected: AtomicU64,
    /// Set when coild must stop (the journal cannot sync): why.
    fatal: Mutex<Option<String>>,
    /// The node carries a removal fence: no ADD is served.
    removed: AtomicBool,
    /// The node booted since its journal was written and the store has not
    /// yet confirmed its leases (a node removed while it was powered off
    /// must not serve from its old blocks before it can see its fence).
    unconfirmed: AtomicBool,
    fatal_notify: tokio::sync::Notify,
    /// The node machine's driver, with `EngineChoice::Machine`.
    engine: std::sync::OnceLock<engine::Engine>,
}

impl<B: Backend, K: KernelOps> std::fmt::Debug for Daemon<B, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("node", &self.cfg.node_name)
            .finish()
    }
}

fn read_boot_id(p: &PathBuf) -> Result<String, FatalError> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            FatalError::new(
                coil::exit::PROBLEMS,
                format!("reading the boot id from {}: {e}", p.display()),
            )
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JournalError> + Send + 'static,
) -> DResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(DaemonError::Journal),
        Err(e) => Err(DaemonError::Internal(format!("journal task failed: {e}"))),
    }
}

/// Opens the journal and checks it, as coild does before it starts;
/// refuses an untrustworthy one, naming the command that shows why.
pub fn open_journal(dir: &PathBuf) -> Result<Journal, FatalError> {
    // The journal creates its directory (and missing parents) itself and
    // fsyncs each new entry's parent: created here first, a power cut right
    // after the first commits could lose the whole journal (found by
    // cli/tests/powerloss.rs).
    let j = Journal::open(dir).map_err(|e| {
        let code = if matches!(e, JournalError::Locked { .. }) {
            coil::exit::UNAVAILABLE
        } else {
            coil::exit::PROBLEMS
        };
        FatalError::new(
            code,
            format!("refusing to start: journal {}: {e}", dir.display()),
        )
    })?;
    let report = j.verify();
    if !report.is_clean() {
        let mut what: Vec<String> = report
            .corrupt
            .iter()
            .map(|c| format!("{}: {}", c.key, c.reason))
            .collect();
        what.extend(report.inconsistent.iter().cloned());
        return Err(FatalError::new(
            coil::exit::PROBLEMS,
            format!(
                "refusing to start: journal {} has {} problem(s): {}; inspect with \
                 `coilctl journal verify --dir {}`",
                dir.display(),
                what.len(),
                what.join("; "),
                dir.display()
            ),
        ));
    }
    Ok(j)
}

/// Starts coild and serves until `shutdown` resolves.
pub async fn run(
    cfg: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), FatalError> {
    // Before anything else: a live coild on this socket (or a file that
    // is not a socket there) means this one must not touch the node.
    super::server::clear_path(&cfg.socket)?;
    let t0 = Instant::now();
    let journal = Arc::new(open_journal(&cfg.journal_dir)?);
    tracing::info!(
        ms = t0.elapsed().as_millis() as u64,
        journal = %cfg.journal_dir.display(),
        "journal opened and verified"
    );
    let (backend, prefix) = match cfg.store.clone() {
        StoreChoice::Embedded => {
            let b = EmbeddedBackend::open(journal.clone()).map_err(|e| {
                FatalError::new(coil::exit::PROBLEMS, format!("embedded store: {e}"))
            })?;
            (AnyBackend::Embedded(Arc::new(b)), "/coil/".to_string())
        }
        StoreChoice::Etcd { opts, prefix } => {
            let b = EtcdBackend::connect(&opts)
                .await
                .map_err(|e| FatalError::new(coil::exit::UNAVAILABLE, format!("etcd: {e}")))?;
            (AnyBackend::Etcd(Box::new(b)), prefix)
        }
    };
    let store = Store::open_lazy(backend, &prefix)
        .map_err(|e| FatalError::new(coil::exit::USAGE, e.to_string()))?;
    let d = Daemon::start(cfg, journal.clone(), store).await?;
    start_metrics(&d).await?;
    serve_until(d, shutdown).await?;
    match Arc::try_unwrap(journal) {
        Ok(j) => j
            .close()
            .map_err(|e| FatalError::new(coil::exit::PROBLEMS, format!("closing journal: {e}"))),
        Err(_) => Ok(()),
    }
}

/// Serves until `shutdown`, or until coild must stop because its journal
/// cannot sync: then coild exits non-zero (systemd or the kubelet restart
/// it, and the restart reopens the journal and recovers), rather than
/// answer every request with an error while looking alive.
async fn serve_until<B: Backend>(
    d: Arc<Daemon<B>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), FatalError> {
    let dd = d.clone();
    let failed = async move { dd.fatal_wait().await };
    super::serve(d.clone(), async move {
        tokio::select! {
            _ = shutdown => {}
            _ = failed => {}
        }
    })
    .await?;
    match d.fatal_reason() {
        Some(why) => Err(FatalError::new(
            coil::exit::PROBLEMS,
            format!("stopping: {why}; a restart reopens the journal and recovers"),
        )),
        None => Ok(()),
    }
}

async fn start_metrics<B: Backend>(d: &Arc<Daemon<B>>) -> Result<(), FatalError> {
    if let Some(addr) = d.cfg.metrics_addr {
        let dd = d.clone();
        crate::metrics::serve(addr, move || dd.metrics_text())
            .await
            .map_err(|e| FatalError::new(coil::exit::USAGE, format!("metrics on {addr}: {e}")))?;
        tracing::info!(%addr, "metrics");
    }
    Ok(())
}

impl<B: Backend> Daemon<B> {
    /// Opens everything, settles what a previous run left half-done, and
    /// republishes the node's blocks. The socket opens only after this.
    pub async fn start(
        cfg: DaemonConfig,
        journal: Arc<Journal>,
        store: Store<B>,
    ) -> Result<Arc<Daemon<B>>, FatalError> {
        let kernel = Kernel::new(cfg.table_id, cfg.protocol_id)
            .map_err(|e| FatalError::new(coil::exit::PROBLEMS, format!("netlink: {e}")))?;
        Daemon::start_with(cfg, journal, store, kernel).await
    }
}

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    /// [`Daemon::start`] over any kernel: the rtnetlink adapter, or the
    /// in-memory model (`coil::kernel_mem::MemKernel`) with which the
    /// driver runs in-process without root.
    pub async fn start_with(
        cfg: DaemonConfig,
        journal: Arc<Journal>,
        store: Store<B>,
        kernel: K,
    ) -> Result<Arc<Daemon<B, K>>, FatalError> {
        let fatal = |e: String| FatalError::new(coil::exit::PROBLEMS, e);
        let boot_id = read_boot_id(&cfg.boot_id_file)?;
        let meta = journal.node_meta().map_err(|e| fatal(e.to_string()))?;
        if let Some(m) = &meta {
            if m.node_name != cfg.node_name {
                return Err(fatal(format!(
                    "journal {} belongs to node {}, not {}",
                    cfg.journal_dir.display(),
                    m.node_name,
                    cfg.node_name
                )));
            }
        }
        if meta.is_none() {
            // A fresh journal on a node that has coil state means the
            // journal was lost: starting would treat every pod as an orphan.
            let links = kernel
                .links()
                .await
                .map_err(|e| fatal(format!("netlink: {e}")))?
                .into_iter()
                .filter(|(_, n, a)| {
                    n.starts_with("coil") && a.as_deref().is_some_and(|a| a.starts_with("coil:"))
                })
                .count();
            let blocks = store
                .node_blocks(&cfg.node_name)
                .await
                .map(|b| b.len())
                .unwrap_or(0);
            if links > 0 || blocks > 0 {
                return Err(fatal(format!(
                    "refusing to start: the journal {} is new, but this node has {links} coil \
                     veth(s) and {blocks} leased block(s); rebuild the journal with \
                     `coilctl node repair {} --rebuild`",
                    cfg.journal_dir.display(),
                    cfg.node_name
                )));
            }
        }
        let (tx, rx) = mpsc::channel(MIRROR_QUEUE);
        let (ttx, trx) = mpsc::channel(TEARDOWN_QUEUE);
        let d = Arc::new(Daemon {
            cfg,
            journal,
            store,
            kernel,
            boot_id: boot_id.clone(),
            state: Mutex::new(NodeState::default()),
            pool_locks: tokio::sync::Mutex::new(HashMap::new()),
            pool_cache: Mutex::new(HashMap::new()),
            mirror: tx,
            store_ok: AtomicBool::new(true),
            add_store_calls: AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
            idle: Mutex::new(HashMap::new()),
            lease_losses: AtomicU64::new(0),
            recovery_actions: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            mirror_dropped: AtomicU64::new(0),
            teardown: ttx,
            index_repairs: AtomicU64::new(0),
            inflight: std::sync::atomic::AtomicUsize::new(0),
            last_request_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            fatal: Mutex::new(None),
            removed: AtomicBool::new(false),
            unconfirmed: AtomicBool::new(meta.as_ref().is_some_and(|m| m.boot_id != boot_id)),
            fatal_notify: tokio::sync::Notify::new(),
            m: Latencies::default(),
            engine: std::sync::OnceLock::new(),
        });
        let machine = d.cfg.engine == EngineChoice::Machine;
        let lease = d.register_first().await;
        if !machine {
            // Before serving, only what the attachments need; orphan links
            // are found by the first full resync, right after. (The
            // machine engine needs no planner: its start rolls every
            // pending intent forward or back, reads the store's view and
            // table 119, and scans the kernel for what no record owns.)
            let t0 = Instant::now();
            let outcomes = d
                .recover(false, false, true)
                .await
                .map_err(|e| fatal(format!("startup recovery: {e}")))?;
            tracing::info!(
                ms = t0.elapsed().as_millis() as u64,
                steps = outcomes.len(),
                "startup recovery done"
            );
            if let Some(bad) = outcomes.iter().find(|o| !o.ok) {
                tracing::warn!(
                    "startup recovery left {} step(s) undone (first: {}: {}); they are retried at the next resync",
                    outcomes.iter().filter(|o| !o.ok).count(),
                    bad.action,
                    bad.error.as_deref().unwrap_or("")
                );
            }
        }
        // The node record names this boot only once the store confirmed
        // the leases: a coild that crashes before then must start
        // unconfirmed again, not serve from blocks the cluster may have
        // given away while the node was off (see `confirm_boot`).
        let unconfirmed = d.unconfirmed.load(Ordering::Relaxed);
        let mut b = Batch::new();
        b.put_node_meta(&NodeMeta {
            node_name: d.cfg.node_name.clone(),
            boot_id: match &meta {
                Some(m)
                    if unconfirmed
                        && !coil::planted::on(coil::planted::Bug::BootRecordedAtStart) =>
                {
                    m.boot_id.clone()
                }
                _ => boot_id,
            },
            cluster_id: meta.map(|m| m.cluster_id).unwrap_or_default(),
            created_unix: coil::journal::now_unix(),
        });
        d.journal.commit(b).map_err(|e| fatal(e.to_string()))?;
        d.reload().map_err(|e| fatal(e.to_string()))?;
        tokio::spawn(index::mirror_task(d.clone(), rx));
        tokio::spawn(tasks::journal_watch(d.clone()));
        tokio::spawn(tasks::liveness_task(d.clone(), lease));
        if machine {
            drop(trx);
            // Serve once the machine's start is done (what the direct
            // engine's startup recovery did before serving), or after
            // a bound: requests wait in the machine meanwhile anyway.
            let t0 = Instant::now();
            let settled = d.start_engine();
            let bound = engine::EFFECT_DEADLINE + Duration::from_secs(5);
            match tokio::time::timeout(bound, settled).await {
                Ok(_) => tracing::info!(
                    ms = t0.elapsed().as_millis() as u64,
                    "the node machine's start is done"
                ),
                Err(_) => tracing::warn!(
                    "the node machine's start is not done after {bound:?}; serving meanwhile"
                ),
            }
        } else {
            tokio::spawn(release::teardown_task(d.clone(), trx));
            tokio::spawn(tasks::resync_task(d.clone()));
        }
        Ok(d)
    }

    /// Rebuilds the in-memory state from the journal. Only while no request
    /// is in flight (at start, or under the exclusive gate).
    fn reload(&self) -> DResult<()> {
        let leases = self.journal.leases()?;
        let atts = self.journal.attachments()?;
        *self.lock() = NodeState::from_records(leases, atts);
        Ok(())
    }

    /// Runs recovery (observe, plan, apply unless `dry_run`) with every
    /// request held off, then reloads the in-memory state.
    pub async fn recover(
        &self,
        dry_run: bool,
        full_scan: bool,
        store_scan: bool,
    ) -> DResult<Vec<coil_recovery::Outcome>> {
        if let Some(r) = self
            .recover_via_engine(dry_run, full_scan, store_scan)
            .await
        {
            return r;
        }
        let _g = self.gate.write().await;
        self.recover_now(dry_run, full_scan, store_scan).await
    }

    /// [`Daemon::recover`] with requests already held off (the gate, or
    /// the machine's driver quiescent).
    async fn recover_now(
        &self,
        dry_run: bool,
        full_scan: bool,
        store_scan: bool,
    ) -> DResult<Vec<coil_recovery::Outcome>> {
        let cx = coil_recovery::Context {
            journal: &self.journal,
            store: &self.store,
            kernel: &self.kernel,
            node: &self.cfg.node_name,
            boot_id: &self.boot_id,
            mtu: self.cfg.mtu,
            full_scan,
            store_scan,
            hold_exports: self.unconfirmed.load(Ordering::Relaxed),
        };
        let (o, out) = coil_recovery::recover(&cx, dry_run)
            .await
            .map_err(|e| DaemonError::Internal(format!("recovery: {e}")))?;
        if o.store.is_some() {
            self.set_removed(o.removed);
            if !o.removed && self.unconfirmed.swap(false, Ordering::Relaxed) {
                self.confirm_boot();
            }
        }
        if !dry_run {
            for o in &out {
                if let coil_recovery::Action::QuarantineLease {
                    block,
                    owner,
                    affected,
                } = &o.action
                {
                    self.lease_losses.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%block, %owner, ?affected,
                        "lost the lease of block {block} to {owner}: no new address is taken from it");
                    self.cfg.events.emit(crate::kube::NodeEvent::LeaseLost {
                        block: block.to_string(),
                        owner: owner.to_string(),
                        pods: affected.len(),
                    });
                }
            }
            self.recovery_actions
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            self.reload()?;
        }
        Ok(out)
    }

    /// The store confirmed the leases since this boot: the journal's node
    /// record names this boot from now on. Deferred: if it is lost, the
    /// next start waits for the store's confirmation again (safe).
    fn confirm_boot(&self) {
        tracing::info!("the store confirmed this node's leases after its reboot");
        match self.journal.node_meta() {
            Ok(Some(m)) if m.boot_id != self.boot_id => {
                let mut b = Batch::new();
                b.put_node_meta(&NodeMeta {
                    boot_id: self.boot_id.clone(),
                    ..m
                });
                if let Err(e) = self.commit_deferred(b) {
                    tracing::warn!("recording this boot in the journal: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("reading the journal's node record: {e}"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.cfg
    }

    /// A durable journal commit off the runtime's threads, timed.
    async fn commit(&self, b: Batch) -> DResult<()> {
        let j = self.journal.clone();
        let t = Instant::now();
        let r = blocking(move || j.commit(b)).await.map(|_| ());
        self.m.commit.observe(t.elapsed());
        if let Err(DaemonError::Journal(e)) = &r {
            self.journal_failed(e);
        }
        r
    }

    /// A deferred journal commit (written now, synced in the background):
    /// only for records recovery can do without after a power cut.
    fn commit_deferred(&self, b: Batch) -> DResult<()> {
        let r = self
            .journal
            .commit_deferred(b)
            .map(|_| ())
            .map_err(DaemonError::from);
        if let Err(DaemonError::Journal(e)) = &r {
            self.journal_failed(e);
        }
        r
    }

    /// After a failed sync the journal refuses every commit until it is
    /// reopened: stop coild (non-zero exit) instead of limping on.
    fn journal_failed(&self, e: &JournalError) {
        if matches!(e, JournalError::Poisoned { .. } | JournalError::Io { .. }) {
            self.set_fatal(format!("the journal cannot commit: {e}"));
        }
    }

    /// Notices a journal poisoned by any writer (recovery, the checkpoint
    /// thread, a request), not only by this driver's commits.
    fn check_journal(&self) {
        if let Some(why) = self.journal.poison_reason() {
            self.set_fatal(format!("the journal cannot commit: {why}"));
        }
    }

    fn set_fatal(&self, why: String) {
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!("{why}; coild stops");
            *f = Some(why);
        }
        drop(f);
        self.fatal_notify.notify_one();
    }

    /// Why coild must stop, if it must.
    pub fn fatal_reason(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn fatal_wait(&self) {
        loop {
            let notified = self.fatal_notify.notified();
            if self.fatal_reason().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// The answer to the socket's health request (the liveness probe).
    pub fn health(&self) -> coil::api::Health {
        let fatal = self.fatal_reason();
        coil::api::Health {
            node: self.cfg.node_name.clone(),
            healthy: fatal.is_none(),
            journal: fatal.unwrap_or_else(|| "ok".into()),
            store_reachable: self.store_ok.load(Ordering::Relaxed),
            free_addresses: self.lock().free_addresses(),
        }
    }

    /// Does coild run the embedded store (the only case where coilctl's
    /// store calls go through the socket)?
    pub fn embedded_store(&self) -> bool {
        matches!(self.cfg.store, StoreChoice::Embedded)
    }

    /// The cluster store's key prefix.
    pub fn store_prefix(&self) -> &str {
        self.store.keys().prefix()
    }

    /// Counts a socket request refused as malformed.
    pub fn count_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes whether the node carries a removal fence.
    fn set_removed(&self, removed: bool) {
        let was = self.removed.swap(removed, Ordering::Relaxed);
        if removed && !was {
            tracing::error!(
                node = %self.cfg.node_name,
                "this node was removed from the cluster (coilctl node remove, or its Node \
                 deleted): its old blocks are quarantined and no ADD is served until \
                 `coilctl node readmit {}`",
                self.cfg.node_name
            );
            self.cfg.events.emit(crate::kube::NodeEvent::Quarantined);
        } else if was && !removed {
            tracing::info!(node = %self.cfg.node_name, "this node was re-admitted");
            self.cfg.events.emit(crate::kube::NodeEvent::Readmitted);
        }
    }

    /// Prometheus metrics (OpenMetrics text), every series labelled with
    /// the node.
    pub fn metrics_text(&self) -> String {
        use crate::metrics::{labels, Exposition};
        let node = self.cfg.node_name.as_str();
        let mut x = Exposition::new(&[("node", node)]);
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        {
            let st = self.lock();
            let mut pools: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for b in st.blocks().filter(|b| b.lease.state == LeaseState::Leased) {
                let e = pools.entry(b.lease.pool.clone()).or_default();
                e.0 += b.used.len() as u64;
                e.1 += b.free();
            }
            x.gauges(
                "coil_addresses_in_use",
                "Addresses assigned on this node, per pool.",
                pools
                    .iter()
                    .map(|(p, (u, _))| (labels(&[("pool", p)]), n(*u)))
                    .collect(),
            );
            x.gauges(
                "coil_addresses_free",
                "Free addresses in this node's blocks, per pool.",
                pools
                    .iter()
                    .map(|(p, (_, f))| (labels(&[("pool", p)]), n(*f)))
                    .collect(),
            );
            let count = |s: LeaseState| st.blocks().filter(|b| b.lease.state == s).count() as u64;
            x.gauge(
                "coil_blocks_leased",
                "Blocks this node leases.",
                n(count(LeaseState::Leased)),
            );
            x.gauge(
                "coil_blocks_quarantined",
                "Blocks this node lost to another.",
                n(count(LeaseState::Quarantined)),
            );
            x.gauge(
                "coil_attachments",
                "Pod attachments on this node.",
                n(st.attachments().count() as u64),
            );
        }
        x.counter(
            "coil_lease_losses_total",
            "Block leases found lost.",
            self.lease_losses.load(Ordering::Relaxed),
        );
        x.counter(
            "coil_recovery_actions_total",
            "Recovery steps applied.",
            self.recovery_actions.load(Ordering::Relaxed),
        );
        x.gauge(
            "coil_store_reachable",
            "1 when the last store call succeeded.",
            i64::from(self.store_ok.load(Ordering::Relaxed)),
        );
        x.counter(
            "coil_store_bad_entries_total",
            "Malformed store entries met (and skipped) by reads.",
            self.store.bad_entries_seen(),
        );
        x.counter(
            "coil_socket_rejected_total",
            "Socket requests refused as malformed.",
            self.rejected.load(Ordering::Relaxed),
        );
        x.gauge(
            "coil_healthy",
            "1 while coild can serve (its journal accepts commits).",
            i64::from(self.fatal_reason().is_none()),
        );
        x.gauge(
            "coil_node_removed",
            "1 while this node carries a removal fence (coilctl node remove).",
            i64::from(self.removed.load(Ordering::Relaxed)),
        );
        if self.cfg.events.enabled() {
            let e = &self.cfg.events.stats;
            x.counters(
                "coil_kube_events_total",
                "Kubernetes Events on this node's Node, by what became of them.",
                [
                    ("sent", &e.sent),
                    ("failed", &e.failed),
                    ("dropped", &e.dropped),
                    ("suppressed", &e.suppressed),
                ]
                .into_iter()
                .map(|(r, v)| (labels(&[("result", r)]), v.load(Ordering::Relaxed)))
                .collect(),
            );
        }
        x.histogram(
            "coil_cni_add_duration_seconds",
            "CNI ADD handling time in coild.",
            &self.m.add,
        );
        x.histogram(
            "coil_cni_del_duration_seconds",
            "CNI DEL handling time in coild (until the answer).",
            &self.m.del,
        );
        x.histogram(
            "coil_journal_commit_duration_seconds",
            "Durable journal commits.",
            &self.m.commit,
        );
        x.render()
    }

    /// The cluster store coild uses.
    pub fn store(&self) -> &Store<B> {
        &self.store
    }

    /// The store backend (served to coilctl over the socket).
    pub fn store_backend(&self) -> &B {
        self.store.backend()
    }

    /// Handles one request; never fails (errors become CNI error answers).
    pub async fn handle(self: &Arc<Self>, req: Request) -> Response {
        let _g = self.gate.read().await;
        let t = Instant::now();
        let cmd = req.command;
        self.inflight.fetch_add(1, Ordering::Relaxed);
        let resp = self.dispatch(req).await;
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        self.last_request_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        match cmd {
            Command::Add => self.m.add.observe(t.elapsed()),
            Command::Del => self.m.del.observe(t.elapsed()),
            _ => {}
        }
        resp
    }

    async fn dispatch(self: &Arc<Self>, req: Request) -> Response {
        let version = req.conf.cni_version.clone();
        let res = match req.command {
            Command::Add => match self.add_via_engine(&req).await {
                Some(r) => r,
                None => self.add(&req).await,
            }
            .map(|r| r.render_with_prev(&version, req.conf.prev_result.as_ref())),
            Command::Del => match self.del_via_engine(&req).await {
                Some(r) => r,
                None => self.del(&req).await,
            }
            .map(|_| serde_json::Value::Null),
            Command::Check => self.check(&req).await.map(|_| serde_json::Value::Null),
            Command::Gc => match self.gc_via_engine(&req).await {
                Some(r) => r,
                None => self.gc(&req).await,
            }
            .map(|_| serde_json::Value::Null),
            Command::Status => self.status().await.map(|_| serde_json::Value::Null),
            Command::Version => Ok(cni::version_result(b"")),
        };
        match res {
            Ok(v) => Response::ok(v),
            Err(e) => {
                tracing::warn!(cmd = ?req.command, container = %req.container_id, "{e}");
                let mut c = e.to_cni();
                if req.command == Command::Status {
                    c.code = code::NOT_AVAILABLE;
                }
                Response::err(&c, &version)
            }
        }
    }
}

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    async fn check(&self, req: &Request) -> DResult<()> {
        let key = request_key(req);
        if let Some(r) = self.check_via_engine(&key).await {
            r?;
        }
        let a = self
            .lock()
            .lookup(&key)
            .cloned()
            .ok_or_else(|| DaemonError::Check(format!("coil holds no attachment for {key}")))?;
        if a.state != AttachmentState::Wired {
            return Err(DaemonError::Check(format!(
                "attachment {key} is {:?}, not wired",
                a.state
            )));
        }
        let mut diffs =
            deadline(format!("checking {key}"), self.kernel.check(&self.spec(&a))).await?;
        if let Some(prev) = &req.conf.prev_result {
            let listed: Vec<String> = prev
                .get("ips")
                .and_then(|v| v.as_array())
                .map(|ips| {
                    ips.iter()
                        .filter_map(|ip| ip.get("address").and_then(|x| x.as_str()))
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            for x in &a.addresses {
                let want = IpNet::from(x.addr).to_string();
                if !listed.iter().any(|l| l == &want) {
                    diffs.push(format!("prevResult does not list {want}"));
                }
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::Check(format!(
                "attachment {key} differs from the journal: {}",
                diffs.join("; ")
            )))
        }
    }

    /// Ready when a leased block has room, or the store is reachable to
    /// lease one.
    async fn status(&self) -> DResult<()> {
        if let Some(why) = self.fatal_reason() {
            return Err(DaemonError::Busy(why));
        }
        if let Some(r) = self.status_via_engine().await {
            return r;
        }
        if self.removed.load(Ordering::Relaxed) {
            return Err(DaemonError::Busy(format!(
                "this node was removed from the cluster; `coilctl node readmit {}`",
                self.cfg.node_name
            )));
        }
        if self.unconfirmed.load(Ordering::Relaxed) {
            return Err(DaemonError::Busy(
                "the cluster store has not yet confirmed this node's blocks after its reboot"
                    .into(),
            ));
        }
        if self.lock().free_addresses() > 0 {
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(2), self.store.list_pools()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(DaemonError::Busy(format!(
                "no free address on this node and the store is unreachable: {e}"
            ))),
            Err(_) => Err(DaemonError::Busy(
                "no free address on this node and the store does not answer".into(),
            )),
        }
    }

    /// Counters for `{"stats":{}}` on the socket (benchmarks, operators).
    pub fn stats(&self) -> serde_json::Value {
        let st = self.lock();
        serde_json::json!({
            "node": self.cfg.node_name,
            "attachments": st.attachments().count(),
            "blocks": st.blocks().count(),
            "free_addresses": st.free_addresses(),
            "store_requests": self.store.backend().requests(),
            "add_path_store_calls": self.add_store_calls.load(Ordering::Relaxed),
            "store_reachable": self.store_ok.load(Ordering::Relaxed),
            "lease_losses": self.lease_losses.load(Ordering::Relaxed),
            "recovery_actions": self.recovery_actions.load(Ordering::Relaxed),
            "quarantined_blocks": st.blocks().filter(|b| b.lease.state == LeaseState::Quarantined).count(),
            "rejected_requests": self.rejected.load(Ordering::Relaxed),
            "store_bad_entries": self.store.bad_entries_seen(),
            "removed": self.removed.load(Ordering::Relaxed),
            "index_updates_dropped": self.mirror_dropped.load(Ordering::Relaxed),
            "index_repairs": self.index_repairs.load(Ordering::Relaxed),
            "healthy": self.fatal_reason().is_none(),
        })
    }
}

/// The attachment a request names: (network, container id, ifname).
fn request_key(req: &Request) -> AttachmentKey {
    AttachmentKey::new(&req.conf.name, &req.container_id, &req.ifname)
}

fn journal_lease(l: &coil::store::BlockLease) -> BlockLease {
    BlockLease {
        pool: l.pool.clone(),
        block: l.block,
        epoch: u64::try_from(l.epoch).unwrap_or(0),
        state: LeaseState::Leased,
        alloc_cursor: 0,
    }
}
