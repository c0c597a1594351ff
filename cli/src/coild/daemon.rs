//! coild's driver: turns CNI requests into journaled, idempotent effects.
//!
//! The order of every operation is fixed: the intent and the new records
//! are made durable in the journal first, then the store or the kernel is
//! changed (create-or-verify, so a replay is harmless), then the journal
//! records the outcome. The in-memory [`NodeState`] is a cache of the
//! journal, changed under a short std mutex that is never held across an
//! await, an fsync, a netlink call or a store call.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coil::cni::{
    self, code, AddResult, CniError, Command, Interface, IpConfig, Request, Response, Route,
};
use coil::journal::{
    AddressEntry, AssignedAddress, Attachment, AttachmentKey, AttachmentState, Batch, BlockLease,
    Intent, IntentOp, IntentState, Journal, JournalError, LeaseState, NodeMeta,
};
use coil::kernel::{gateway_for, Kernel, KernelError, KernelOps, WireSpec};
use coil::node::{host_veth_name, NodeState, Reservation};
use coil::store::embedded::EmbeddedBackend;
use coil::store::etcd::{EtcdBackend, EtcdOptions};
use coil::store::{AddressRecord, AnyBackend, Backend, Family, NodeRecord, Store, StoreError};
use ipnet::IpNet;
use tokio::sync::mpsc;

/// Which cluster store coild uses.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    Etcd { opts: EtcdOptions, prefix: String },
    Embedded,
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
}

impl DaemonError {
    pub fn to_cni(&self) -> CniError {
        let c = match self {
            DaemonError::Kernel(KernelError::NetnsMissing(_)) => code::NETNS_MISSING,
            DaemonError::Kernel(KernelError::BadNetns(_)) => code::INVALID_ENV,
            DaemonError::Kernel(KernelError::Timeout(..)) => code::TRY_AGAIN_LATER,
            DaemonError::Kernel(KernelError::InterfaceExists { .. }) => code::INTERFACE_EXISTS,
            DaemonError::Kernel(_) => code::KERNEL,
            DaemonError::Store(StoreError::Exhausted { .. }) => code::POOL_EXHAUSTED,
            DaemonError::Store(StoreError::PoolNotFound(_)) => code::NO_POOL,
            DaemonError::Store(StoreError::NodeRemoved { .. }) => code::TRY_AGAIN_LATER,
            DaemonError::Store(e) if e.is_retryable() => code::TRY_AGAIN_LATER,
            DaemonError::Store(_) => code::INTERNAL,
            DaemonError::Journal(JournalError::Poisoned { .. }) => code::TRY_AGAIN_LATER,
            DaemonError::Journal(_) => code::JOURNAL,
            DaemonError::Busy(_) => code::TRY_AGAIN_LATER,
            DaemonError::Check(_) => code::CHECK_FAILED,
            DaemonError::Config(_) => code::INVALID_CONFIG,
            DaemonError::Internal(_) => code::INTERNAL,
        };
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
        });
        let t0 = Instant::now();
        // Before serving, only what the attachments need; orphan links are
        // found by the first full resync, right after.
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
        let mut b = Batch::new();
        b.put_node_meta(&NodeMeta {
            node_name: d.cfg.node_name.clone(),
            boot_id,
            cluster_id: meta.map(|m| m.cluster_id).unwrap_or_default(),
            created_unix: coil::journal::now_unix(),
        });
        d.journal.commit(b).map_err(|e| fatal(e.to_string()))?;
        d.reload().map_err(|e| fatal(e.to_string()))?;
        tokio::spawn(mirror_task(d.clone(), rx));
        tokio::spawn(teardown_task(d.clone(), trx));
        tokio::spawn(journal_watch(d.clone()));
        tokio::spawn(liveness_task(d.clone()));
        tokio::spawn(resync_task(d.clone()));
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
        let _g = self.gate.write().await;
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
                tracing::info!("the store confirmed this node's leases after its reboot");
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
                }
            }
            self.recovery_actions
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            self.reload()?;
        }
        Ok(out)
    }

    /// [`Daemon::release_idle_blocks`] under the exclusive gate.
    async fn release_idle_blocks_gated(&self) {
        let _g = self.gate.write().await;
        self.release_idle_blocks().await;
    }

    /// Releases blocks that stayed empty for two resyncs in a row, keeping
    /// `min_blocks` of each address family (so a node that served
    /// dual-stack pods keeps a block of each family, and can tell the
    /// pool's families from its blocks during a store outage). Called
    /// under the exclusive gate.
    async fn release_idle_blocks(&self) {
        let (idle_now, mut leased) = {
            let st = self.lock();
            let mut leased: HashMap<Family, usize> = HashMap::new();
            for b in st.blocks().filter(|b| b.lease.state == LeaseState::Leased) {
                *leased.entry(Family::of(&b.lease.block)).or_default() += 1;
            }
            let idle: Vec<BlockLease> = st
                .blocks()
                .filter(|b| b.lease.state == LeaseState::Leased && b.used.is_empty())
                .map(|b| b.lease.clone())
                .collect();
            (idle, leased)
        };
        let ripe: Vec<BlockLease> = {
            let mut seen = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let now: BTreeSet<IpNet> = idle_now.iter().map(|l| l.block).collect();
            seen.retain(|b, _| now.contains(b));
            let mut ripe = Vec::new();
            for l in &idle_now {
                let n = seen.entry(l.block).or_insert(0);
                *n += 1;
                if *n >= 2 {
                    ripe.push(l.clone());
                }
            }
            ripe
        };
        for l in ripe {
            let keep = leased.entry(Family::of(&l.block)).or_default();
            if *keep <= self.cfg.min_blocks {
                continue;
            }
            match self.release_block(&l).await {
                Ok(()) => {
                    *keep -= 1;
                    self.idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&l.block);
                    tracing::info!(block = %l.block, pool = %l.pool, "released an empty block");
                }
                Err(e) => tracing::warn!(block = %l.block, "releasing an empty block: {e}"),
            }
        }
    }

    /// Releases one empty block: Releasing + intent durable, route
    /// withdrawn, store lease released (fenced by owner and epoch), then the
    /// record dropped. If the store does not answer, the block goes back
    /// to service and the release is retried later.
    async fn release_block(&self, l: &BlockLease) -> DResult<()> {
        let intent = Intent {
            id: self.journal.next_intent_id(),
            op: IntentOp::ReleaseBlock {
                pool: l.pool.clone(),
                block: l.block,
            },
            state: IntentState::Pending,
            created_unix: coil::journal::now_unix(),
        };
        let releasing = BlockLease {
            state: LeaseState::Releasing,
            ..l.clone()
        };
        let mut b = Batch::new();
        b.put_intent(&intent).put_lease(&releasing);
        self.journal.commit(b)?;
        coil::failpoint::hit("release.intent");
        self.lock().remove_lease(&l.block);
        self.kernel.withdraw_block(l.block).await?;
        let res = async {
            let cur = match self.store.block(l.block).await {
                Ok((_, cur)) => cur,
                // A malformed value at the block's key is not a lease we
                // can prove is ours: leave it (reported by coilctl store
                // check) and forget our side.
                Err(e) if e.is_corrupt() => {
                    tracing::warn!(block = %l.block, "not releasing a malformed store entry: {e}");
                    None
                }
                Err(e) => return Err(e),
            };
            match cur {
                Some(c)
                    if c.node == self.cfg.node_name
                        && u64::try_from(c.epoch).ok() == Some(l.epoch) =>
                {
                    self.store.release_block(&c).await
                }
                // Already gone, or no longer ours: nothing to release.
                _ => Ok(()),
            }
        }
        .await;
        if res.is_ok() {
            coil::failpoint::hit("release.released");
        }
        let mut b = Batch::new();
        b.delete_intent(intent.id);
        match res {
            Ok(()) => {
                b.delete_lease(l.block);
                self.journal.commit(b)?;
                Ok(())
            }
            Err(e) => {
                b.put_lease(l);
                self.journal.commit(b)?;
                self.lock().insert_lease(l.clone());
                self.kernel.export_block(l.block).await?;
                Err(e.into())
            }
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
        } else if was && !removed {
            tracing::info!(node = %self.cfg.node_name, "this node was re-admitted");
        }
    }

    /// Prometheus metrics.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let node = &self.cfg.node_name;
        {
            let st = self.lock();
            let mut pools: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for b in st.blocks().filter(|b| b.lease.state == LeaseState::Leased) {
                let e = pools.entry(b.lease.pool.clone()).or_default();
                e.0 += b.used.len() as u64;
                e.1 += b.free();
            }
            out.push_str("# HELP coil_addresses_in_use Addresses assigned on this node, per pool.\n# TYPE coil_addresses_in_use gauge\n");
            for (p, (u, _)) in &pools {
                let _ = writeln!(
                    out,
                    "coil_addresses_in_use{{node=\"{node}\",pool=\"{p}\"}} {u}"
                );
            }
            out.push_str("# HELP coil_addresses_free Free addresses in this node's blocks, per pool.\n# TYPE coil_addresses_free gauge\n");
            for (p, (_, f)) in &pools {
                let _ = writeln!(
                    out,
                    "coil_addresses_free{{node=\"{node}\",pool=\"{p}\"}} {f}"
                );
            }
            let leased = st
                .blocks()
                .filter(|b| b.lease.state == LeaseState::Leased)
                .count();
            let quarantined = st
                .blocks()
                .filter(|b| b.lease.state == LeaseState::Quarantined)
                .count();
            let _ = write!(
                out,
                "# HELP coil_blocks_leased Blocks this node leases.\n# TYPE coil_blocks_leased gauge\ncoil_blocks_leased{{node=\"{node}\"}} {leased}\n\
                 # HELP coil_blocks_quarantined Blocks this node lost to another.\n# TYPE coil_blocks_quarantined gauge\ncoil_blocks_quarantined{{node=\"{node}\"}} {quarantined}\n\
                 # HELP coil_attachments Pod attachments on this node.\n# TYPE coil_attachments gauge\ncoil_attachments{{node=\"{node}\"}} {}\n",
                st.attachments().count()
            );
        }
        let _ = write!(
            out,
            "# HELP coil_lease_losses_total Block leases found lost.\n# TYPE coil_lease_losses_total counter\ncoil_lease_losses_total{{node=\"{node}\"}} {}\n\
             # HELP coil_recovery_actions_total Recovery steps applied.\n# TYPE coil_recovery_actions_total counter\ncoil_recovery_actions_total{{node=\"{node}\"}} {}\n\
             # HELP coil_store_reachable 1 when the last store call succeeded.\n# TYPE coil_store_reachable gauge\ncoil_store_reachable{{node=\"{node}\"}} {}\n\
             # HELP coil_store_bad_entries_total Malformed store entries met (and skipped) by reads.\n# TYPE coil_store_bad_entries_total counter\ncoil_store_bad_entries_total{{node=\"{node}\"}} {}\n\
             # HELP coil_socket_rejected_total Socket requests refused as malformed.\n# TYPE coil_socket_rejected_total counter\ncoil_socket_rejected_total{{node=\"{node}\"}} {}\n\
             # HELP coil_healthy 1 while coild can serve (its journal accepts commits).\n# TYPE coil_healthy gauge\ncoil_healthy{{node=\"{node}\"}} {}\n\
             # HELP coil_node_removed 1 while this node carries a removal fence (coilctl node remove).\n# TYPE coil_node_removed gauge\ncoil_node_removed{{node=\"{node}\"}} {}\n",
            self.lease_losses.load(Ordering::Relaxed),
            self.recovery_actions.load(Ordering::Relaxed),
            u8::from(self.store_ok.load(Ordering::Relaxed)),
            self.store.bad_entries_seen(),
            self.rejected.load(Ordering::Relaxed),
            u8::from(self.fatal_reason().is_none()),
            u8::from(self.removed.load(Ordering::Relaxed)),
        );
        let lb = format!("node=\"{node}\"");
        out.push_str(&self.m.add.render(
            "coil_cni_add_duration_seconds",
            "CNI ADD handling time in coild.",
            &lb,
        ));
        out.push_str(&self.m.del.render(
            "coil_cni_del_duration_seconds",
            "CNI DEL handling time in coild (until the answer).",
            &lb,
        ));
        out.push_str(&self.m.commit.render(
            "coil_journal_commit_duration_seconds",
            "Durable journal commits.",
            &lb,
        ));
        out
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
            Command::Add => self
                .add(&req)
                .await
                .map(|r| r.render_with_prev(&version, req.conf.prev_result.as_ref())),
            Command::Del => self.del(&req).await.map(|_| serde_json::Value::Null),
            Command::Check => self.check(&req).await.map(|_| serde_json::Value::Null),
            Command::Gc => self.gc(&req).await.map(|_| serde_json::Value::Null),
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

    /// The pool for a pod and the families its pods get: the pool named
    /// like its namespace if there is one, else `default`.
    async fn pool_for(self: &Arc<Self>, namespace: Option<&str>) -> DResult<(String, Vec<Family>)> {
        if let Some(ns) = namespace {
            if ns != "default" && coil::store::model::validate_pool_name(ns).is_ok() {
                if let Some(families) = self.pool_shape(ns).await? {
                    return Ok((ns.to_string(), families));
                }
            }
        }
        match self.pool_shape("default").await? {
            Some(families) => Ok(("default".into(), families)),
            None => Err(StoreError::PoolNotFound("default".into()).into()),
        }
    }

    /// The families of pool `name` (None: there is no such pool), from a
    /// cache of the store's answer. An entry older than `pool_cache_ttl`
    /// still answers at once and is refreshed in the background, so an ADD
    /// waits for the store only the first time a pool is asked for after a
    /// start (a store that hangs must not stall every ADD at each expiry).
    /// When that first read fails (outage, bad entry), the families of the
    /// blocks this node leases from the pool answer (idle release keeps one
    /// block of each family, see `release_idle_blocks`) and are cached.
    async fn pool_shape(self: &Arc<Self>, name: &str) -> DResult<Option<Vec<Family>>> {
        let cached = self
            .pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        if let Some((f, t)) = cached {
            if t.elapsed() >= self.cfg.pool_cache_ttl {
                self.refresh_pool_shape(name);
            }
            return Ok(f);
        }
        self.add_store_calls.fetch_add(1, Ordering::Relaxed);
        match self.read_pool_shape(name).await {
            Ok(f) => Ok(f),
            Err(e) => {
                let held = self.lock().families_of(name);
                if held.is_empty() {
                    return Err(e.into());
                }
                tracing::warn!(
                    pool = name,
                    families = ?held,
                    "reading the pool: {e}; serving the families of this node's blocks"
                );
                self.cache_pool_shape(name, Some(held.clone()));
                Ok(Some(held))
            }
        }
    }

    /// Reads pool `name`'s families from the store and caches them.
    async fn read_pool_shape(&self, name: &str) -> Result<Option<Vec<Family>>, StoreError> {
        let f = self.store.get_pool(name).await?.map(|p| p.families());
        self.cache_pool_shape(name, f.clone());
        Ok(f)
    }

    fn cache_pool_shape(&self, name: &str, f: Option<Vec<Family>>) {
        let mut cache = self.pool_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= POOL_CACHE_MAX && !cache.contains_key(name) {
            let ttl = self.cfg.pool_cache_ttl;
            cache.retain(|_, (_, t)| t.elapsed() < ttl);
            if cache.len() >= POOL_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(name.to_string(), (f, Instant::now()));
    }

    /// Refreshes a stale cache entry off the ADD path. The entry's clock
    /// restarts first, so one refresh runs per pool and period, and a
    /// refresh that fails keeps the old answer for another period.
    fn refresh_pool_shape(self: &Arc<Self>, name: &str) {
        if let Some(e) = self
            .pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
        {
            e.1 = Instant::now();
        }
        let d = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            if let Err(e) = d.read_pool_shape(&name).await {
                tracing::debug!(pool = %name, "refreshing the pool's families: {e}");
            }
        });
    }

    async fn pool_lock(&self, pool: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.pool_locks
            .lock()
            .await
            .entry(pool.to_string())
            .or_default()
            .clone()
    }

    /// Leases one more `family` block of `pool` (intent first), unless
    /// another ADD did while we waited for the pool's lock.
    async fn acquire_block(&self, pool: &str, family: Family) -> DResult<()> {
        let lock = self.pool_lock(pool).await;
        let _g = lock.lock().await;
        if self.lock().has_room(pool, family) {
            return Ok(());
        }
        let id = self.journal.next_intent_id();
        let mut b = Batch::new();
        b.put_intent(&Intent {
            id,
            op: IntentOp::AcquireBlock {
                pool: pool.to_string(),
                block: None,
            },
            state: IntentState::Pending,
            created_unix: coil::journal::now_unix(),
        });
        self.commit(b).await?;
        coil::failpoint::hit("acquire.intent");
        self.add_store_calls.fetch_add(1, Ordering::Relaxed);
        let got = self
            .store
            .acquire_block_of(pool, Some(family), &self.cfg.node_name)
            .await;
        if matches!(got, Err(StoreError::NodeRemoved { .. })) {
            self.set_removed(true);
        }
        self.store_ok.store(
            !matches!(&got, Err(e) if e.is_unavailable()),
            Ordering::Relaxed,
        );
        if got.is_ok() {
            coil::failpoint::hit("acquire.leased");
        }
        let mut b = Batch::new();
        b.delete_intent(id);
        let lease = match got {
            Ok(l) => {
                let jl = journal_lease(&l);
                b.put_lease(&jl);
                Some(jl)
            }
            Err(e) => {
                self.commit(b).await?;
                return Err(e.into());
            }
        };
        self.commit(b).await?;
        if let Some(l) = lease {
            tracing::info!(pool, block = %l.block, epoch = l.epoch, "leased a block");
            let block = l.block;
            self.lock().insert_lease(l);
            if let Err(e) = self.kernel.export_block(block).await {
                tracing::warn!(%block, "publishing the block in table {}: {e}", self.cfg.table_id);
            }
        }
        Ok(())
    }

    fn spec(&self, a: &Attachment) -> WireSpec {
        coil::node::wire_spec(a, self.cfg.mtu)
    }

    fn result(&self, a: &Attachment, host_mac: String, pod_mac: String) -> AddResult {
        let ips = a
            .addresses
            .iter()
            .map(|x| IpConfig {
                address: IpNet::new(x.addr, if x.addr.is_ipv4() { 32 } else { 128 })
                    .unwrap_or_else(|_| IpNet::from(x.addr)),
                gateway: gateway_for(&x.addr),
                interface: 1,
            })
            .collect();
        let mut routes = Vec::new();
        for fam_v4 in [true, false] {
            if let Some(x) = a.addresses.iter().find(|x| x.addr.is_ipv4() == fam_v4) {
                let dst: IpNet = if fam_v4 {
                    IpNet::V4(ipnet::Ipv4Net::default())
                } else {
                    IpNet::V6(ipnet::Ipv6Net::default())
                };
                routes.push(Route {
                    dst,
                    gw: gateway_for(&x.addr),
                });
            }
        }
        AddResult {
            interfaces: vec![
                Interface {
                    name: a.host_veth.clone(),
                    mac: host_mac,
                    sandbox: None,
                },
                Interface {
                    name: a.key.ifname.clone(),
                    mac: pod_mac,
                    sandbox: Some(a.netns.clone()),
                },
            ],
            ips,
            routes,
        }
    }

    async fn add(self: &Arc<Self>, req: &Request) -> DResult<AddResult> {
        let t0 = Instant::now();
        if self.removed.load(Ordering::Relaxed) {
            // Its old blocks may be another node's now: serve no address.
            return Err(DaemonError::Store(StoreError::NodeRemoved {
                node: self.cfg.node_name.clone(),
            }));
        }
        if self.unconfirmed.load(Ordering::Relaxed) {
            return Err(DaemonError::Busy(
                "this node rebooted and the cluster store has not yet confirmed its blocks \
                 (a node removed while powered off must not serve from them); retry when \
                 the store answers"
                    .into(),
            ));
        }
        let key = request_key(req);
        let netns = req.netns.clone().unwrap_or_default();
        let existing = self.lock().lookup(&key).cloned();
        // The checked pod netns, opened once for the check and the wiring.
        let mut opened: Option<K::Netns> = None;
        let (att, intent) = match existing {
            Some(a) if a.state == AttachmentState::Wired => {
                // A repeated ADD: the same answer, nothing changed.
                let w = deadline(
                    format!("reading the wiring of {}", a.key),
                    self.kernel.wire_info(&self.spec(&a)),
                )
                .await?;
                return Ok(self.result(&a, w.host_mac, w.pod_mac));
            }
            Some(a) if a.state == AttachmentState::Releasing => {
                return Err(DaemonError::Busy(format!(
                    "attachment {key} is being deleted; retry the ADD"
                )))
            }
            Some(a) => {
                // Reserved but never wired (an earlier ADD failed after its
                // journal write): wire it now with the same address.
                let id = self.journal.next_intent_id();
                (a, id)
            }
            None => {
                // Before anything is reserved: the path must be a pod's own
                // network namespace (never coild's or the host's).
                opened = Some(self.kernel.open_pod_netns(&netns).await?);
                let (pool, families) = self.pool_for(req.pod.namespace.as_deref()).await?;
                // One address of each family, or none: a family that cannot
                // be served gives back what the others reserved.
                let mut resvs: Vec<Reservation> = Vec::with_capacity(families.len());
                for family in families {
                    let r = loop {
                        if let Some(r) = self.lock().reserve(&pool, family) {
                            break r;
                        }
                        if let Err(e) = self.acquire_block(&pool, family).await {
                            let mut st = self.lock();
                            for r in &resvs {
                                st.unreserve(r);
                            }
                            return Err(e);
                        }
                    };
                    resvs.push(r);
                }
                let att = Attachment {
                    key: key.clone(),
                    netns: netns.clone(),
                    pod_namespace: req.pod.namespace.clone().unwrap_or_default(),
                    pod_name: req.pod.name.clone().unwrap_or_default(),
                    pool: pool.clone(),
                    addresses: resvs
                        .iter()
                        .map(|r| AssignedAddress {
                            addr: r.addr,
                            block: r.block,
                        })
                        .collect(),
                    host_veth: host_veth_name(&key),
                    state: AttachmentState::Reserved,
                    boot_id: self.boot_id.clone(),
                    created_unix: coil::journal::now_unix(),
                };
                if coil::planted::on(coil::planted::Bug::WireBeforeIntent) {
                    // Planted (tests only): the kernel before the journal.
                    if let Err(e) = self.kernel.wire_in(&self.spec(&att), opened.take()).await {
                        let mut st = self.lock();
                        for r in &resvs {
                            st.unreserve(r);
                        }
                        return Err(e.into());
                    }
                    coil::failpoint::hit("add.wired");
                }
                let id = self.journal.next_intent_id();
                let mut b = Batch::new();
                b.put_intent(&Intent {
                    id,
                    op: IntentOp::Wire { key: key.clone() },
                    state: IntentState::Pending,
                    created_unix: att.created_unix,
                })
                .put_attachment(&att);
                for r in &resvs {
                    b.put_address(
                        r.addr,
                        &AddressEntry {
                            attachment: key.clone(),
                            block: r.block,
                        },
                    )
                    .put_lease(&r.lease);
                }
                if let Err(e) = self.commit(b).await {
                    let mut st = self.lock();
                    for r in &resvs {
                        st.unreserve(r);
                    }
                    return Err(e);
                }
                self.lock().insert_attachment(att.clone());
                coil::failpoint::hit("add.reserved");
                (att, id)
            }
        };
        // From here on the record's own key (a format-1 record keeps its).
        let key = att.key.clone();
        let t1 = t0.elapsed();
        let spec = self.spec(&att);
        let wired =
            match deadline(format!("wiring {key}"), self.kernel.wire_in(&spec, opened)).await {
                Ok(w) => w,
                Err(e @ KernelError::Timeout(..)) => {
                    // The kernel may be half way: keep the reservation and its
                    // pending intent; a retried ADD wires it again (replacing
                    // what is there) and recovery settles it otherwise.
                    return Err(e.into());
                }
                Err(e) => {
                    // Undo: the kernel left nothing (wire cleans up after
                    // itself); free the reservation in the journal, then here.
                    let mut b = Batch::new();
                    b.delete_attachment(&key).delete_intent(intent);
                    for x in &att.addresses {
                        b.delete_address(x.addr);
                    }
                    self.commit(b).await?;
                    self.lock().remove_attachment(&key);
                    return Err(e.into());
                }
            };
        let done = Attachment {
            state: AttachmentState::Wired,
            ..att
        };
        let mut b = Batch::new();
        b.put_attachment(&done).delete_intent(intent);
        coil::failpoint::hit("add.wired");
        let t2 = t0.elapsed();
        // Written, not waited for: the durable Reserved record and its Wire
        // intent already make recovery keep this pod (it adopts the wiring);
        // see "Which record must be durable before the answer" in
        // docs/ARCHITECTURE.md.
        self.commit_deferred(b)?;
        self.lock().insert_attachment(done.clone());
        tracing::debug!(
            attachment = %key,
            reserve_us = t1.as_micros() as u64,
            wire_us = (t2 - t1).as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "ADD"
        );
        coil::failpoint::hit("add.recorded");
        for x in &done.addresses {
            self.mirror(Mirror::Put(self.record(&done, x)));
        }
        Ok(self.result(&done, wired.host_mac, wired.pod_mac))
    }

    /// Brings the address index in line with the journal for this node's
    /// leased blocks: entries naming this node that no wired attachment
    /// holds are deleted, wired attachments missing from it are put. The
    /// mirror queue lives in memory, so a kill -9 during a store outage
    /// loses its pending updates; this repairs them. Returns the repairs
    /// made; stops quietly while the store does not answer.
    async fn reconcile_index(&self) -> usize {
        let me = self.cfg.node_name.clone();
        let (blocks, wired, busy) = {
            let st = self.lock();
            let blocks: Vec<IpNet> = st
                .blocks()
                .filter(|b| b.lease.state == LeaseState::Leased)
                .map(|b| b.lease.block)
                .collect();
            let mut wired: HashMap<std::net::IpAddr, AddressRecord> = HashMap::new();
            let mut busy: BTreeSet<std::net::IpAddr> = BTreeSet::new();
            for a in st.attachments() {
                for x in &a.addresses {
                    if a.state == AttachmentState::Wired {
                        wired.insert(x.addr, self.record(a, x));
                    } else {
                        busy.insert(x.addr);
                    }
                }
            }
            (blocks, wired, busy)
        };
        let mut repairs = 0;
        for b in blocks {
            let Ok(entries) = self.store.addresses_in(&b).await else {
                return repairs;
            };
            for e in entries.iter().filter(|e| e.node == me) {
                let held = wired
                    .get(&e.address)
                    .is_some_and(|w| w.container_id == e.container_id && w.ifname == e.ifname);
                if !held && !busy.contains(&e.address) {
                    if let Ok(true) = self.store.delete_address(e).await {
                        repairs += 1;
                    }
                }
            }
            for (addr, rec) in wired.iter().filter(|(a, _)| b.contains(*a)) {
                let present = entries.iter().any(|e| {
                    e.address == *addr
                        && e.node == me
                        && e.container_id == rec.container_id
                        && e.ifname == rec.ifname
                });
                if !present && self.store.put_address(rec).await.is_ok() {
                    repairs += 1;
                }
            }
        }
        if repairs > 0 {
            tracing::info!(repairs, "address index brought in line with the journal");
            self.index_repairs
                .fetch_add(repairs as u64, Ordering::Relaxed);
        }
        repairs
    }

    /// Queues an address index update without ever waiting: the index is
    /// a mirror, and a full queue (a long store outage under churn) drops
    /// the update, counted (stats `index_updates_dropped`), rather than
    /// hold a request or grow without bound. The index only informs
    /// coilctl and the controller; allocation never reads it, so a dropped
    /// update leaves a stale hint, never a second owner.
    fn mirror(&self, m: Mirror) {
        if self.mirror.try_send(m).is_err() {
            let n = self.mirror_dropped.fetch_add(1, Ordering::Relaxed);
            if n % 1000 == 0 {
                tracing::warn!(
                    dropped = n + 1,
                    "address index queue full; dropping updates"
                );
            }
        }
    }

    fn record(&self, a: &Attachment, x: &AssignedAddress) -> AddressRecord {
        AddressRecord {
            address: x.addr,
            pool: a.pool.clone(),
            block: x.block,
            node: self.cfg.node_name.clone(),
            network: a.key.network.clone(),
            container_id: a.key.container_id.clone(),
            ifname: a.key.ifname.clone(),
            pod_namespace: a.pod_namespace.clone(),
            pod_name: a.pod_name.clone(),
        }
    }

    /// Releases one attachment: the intent and the Releasing state are made
    /// durable first; the kernel teardown and the removal of the records
    /// follow, in the background unless `wait`. The addresses stay taken
    /// until the veth is gone, so none is handed out while its kernel state
    /// may still exist. Deleting a veth costs the kernel ~20 ms (an RCU
    /// grace period); a DEL need not wait for it.
    async fn release(self: &Arc<Self>, key: &AttachmentKey, wait: bool) -> DResult<()> {
        let Some(a) = self.lock().attachment(key).cloned() else {
            return Ok(());
        };
        if a.state == AttachmentState::Releasing {
            // Already being released (a repeated DEL): nothing more to do.
            return Ok(());
        }
        let id = self.journal.next_intent_id();
        let releasing = Attachment {
            state: AttachmentState::Releasing,
            ..a.clone()
        };
        let mut b = Batch::new();
        b.put_intent(&Intent {
            id,
            op: IntentOp::Unwire { key: key.clone() },
            state: IntentState::Pending,
            created_unix: coil::journal::now_unix(),
        })
        .put_attachment(&releasing);
        self.commit(b).await?;
        if coil::planted::on(coil::planted::Bug::ReuseWhileTearingDown) {
            // Planted (tests only): the addresses look free while the veth
            // still holds them.
            let mut st = self.lock();
            st.remove_attachment(key);
            st.insert_attachment(Attachment {
                addresses: Vec::new(),
                ..releasing
            });
        } else {
            self.lock().insert_attachment(releasing);
        }
        coil::failpoint::hit("del.releasing");
        if wait {
            return self.finish_release(&a, id).await;
        }
        // Doom the veth before answering (its pod end leaves the pod's way:
        // a new ADD may reuse the ifname at once); its deletion is batched.
        let doomed = deadline(
            format!("dooming the veth of {}", a.key),
            self.kernel.doom(&a.host_veth, &a.netns, &a.key.ifname),
        )
        .await;
        match doomed {
            Ok(_) => {
                if let Err(
                    mpsc::error::TrySendError::Full((a, id))
                    | mpsc::error::TrySendError::Closed((a, id)),
                ) = self.teardown.try_send((a, id))
                {
                    self.finish_release_later(a, id);
                }
            }
            Err(e) => {
                tracing::warn!(attachment = %a.key, "dooming its veth: {e}; deleting it now");
                self.finish_release_later(a, id);
            }
        }
        Ok(())
    }

    /// Finishes one release in the background, retried with backoff (the
    /// unbatched path: the teardown queue is full, or dooming failed).
    fn finish_release_later(self: &Arc<Self>, a: Attachment, id: u64) {
        let d = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            for attempt in 1..=10 {
                match d.finish_release(&a, id).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(attachment = %a.key, attempt, "releasing: {e}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
            tracing::error!(attachment = %a.key, "release keeps failing; the next start or resync retries it");
        });
    }

    /// Has no request been in flight for `quiet`?
    fn idle_for(&self, quiet: Duration) -> bool {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let last = self.last_request_ms.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(last) >= quiet.as_millis() as u64
    }

    /// Deletes the doomed veths in one request, then drops their records
    /// in one journal batch; their addresses are free only then. Holds the
    /// request gate (shared), so recovery never interleaves.
    async fn flush_doomed(self: &Arc<Self>, doomed: Vec<(Attachment, u64)>) {
        let _g = self.gate.read().await;
        // Recovery may have settled some meanwhile: only what is still
        // ours and still Releasing.
        let live: Vec<(Attachment, u64)> = {
            let st = self.lock();
            doomed
                .into_iter()
                .filter(|(a, _)| {
                    st.attachment(&a.key).is_some_and(|x| {
                        x.state == AttachmentState::Releasing && x.addresses == a.addresses
                    })
                })
                .collect()
        };
        if let Err(e) = deadline("deleting doomed veths", self.kernel.delete_doomed()).await {
            tracing::warn!(
                count = live.len(),
                "batched veth teardown: {e}; one by one instead"
            );
            for (a, id) in live {
                self.finish_release_later(a, id);
            }
            return;
        }
        coil::failpoint::hit("del.unwired");
        let mut b = Batch::new();
        for (a, id) in &live {
            b.delete_attachment(&a.key).delete_intent(*id);
            for x in &a.addresses {
                b.delete_address(x.addr);
            }
        }
        if let Err(e) = self.commit(b).await {
            // The veths are gone; the records stay Releasing with their
            // intents, and the next resync drops them.
            tracing::warn!("recording batched teardown: {e}");
            return;
        }
        let mut st = self.lock();
        for (a, _) in &live {
            st.remove_attachment(&a.key);
        }
        drop(st);
        for (a, _) in &live {
            for x in &a.addresses {
                self.mirror(Mirror::Delete(self.record(a, x)));
            }
        }
    }
}

/// DEL's kernel teardown, batched: each released attachment's veth is
/// doomed before DEL answers (renamed out of the pod's way, moved to a link group),
/// and the group is deleted in one request when requests pause, when 128
/// are waiting or after a second, whichever comes first. A veth deletion
/// costs the kernel an RCU grace period under the rtnl lock (~20 ms, every
/// ADD's netlink calls wait for it); one batch deletion costs about the
/// same as one. Addresses stay reserved until their veth is gone, and a
/// crash leaves Releasing attachments with pending Unwire intents, which
/// recovery finishes one by one.
const TEARDOWN_MAX: usize = 128;
const TEARDOWN_MAX_AGE: Duration = Duration::from_secs(1);
const TEARDOWN_QUIET: Duration = Duration::from_millis(15);

async fn teardown_task<B: Backend, K: KernelOps>(
    d: Arc<Daemon<B, K>>,
    mut rx: mpsc::Receiver<(Attachment, u64)>,
) {
    let mut doomed: Vec<(Attachment, u64)> = Vec::new();
    let mut oldest = Instant::now();
    loop {
        let wait = if doomed.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(5)
        };
        tokio::select! {
            m = rx.recv() => match m {
                Some(x) => {
                    if doomed.is_empty() {
                        oldest = Instant::now();
                    }
                    doomed.push(x);
                }
                None => return,
            },
            _ = tokio::time::sleep(wait) => {}
        }
        if !doomed.is_empty()
            && (doomed.len() >= TEARDOWN_MAX
                || oldest.elapsed() >= TEARDOWN_MAX_AGE
                || d.idle_for(TEARDOWN_QUIET))
        {
            d.flush_doomed(std::mem::take(&mut doomed)).await;
        }
    }
}

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    async fn finish_release(&self, a: &Attachment, intent: u64) -> DResult<()> {
        deadline(
            format!("removing the veth {} of {}", a.host_veth, a.key),
            self.kernel.unwire(&a.host_veth),
        )
        .await?;
        coil::failpoint::hit("del.unwired");
        let mut b = Batch::new();
        b.delete_attachment(&a.key).delete_intent(intent);
        for x in &a.addresses {
            b.delete_address(x.addr);
        }
        self.commit(b).await?;
        self.lock().remove_attachment(&a.key);
        for x in &a.addresses {
            self.mirror(Mirror::Delete(self.record(a, x)));
        }
        Ok(())
    }

    async fn del(self: &Arc<Self>, req: &Request) -> DResult<()> {
        let key = request_key(req);
        // The record's own key: a format-1 attachment keeps its key.
        let found = self.lock().lookup(&key).map(|a| a.key.clone());
        match found {
            Some(k) => self.release(&k, false).await,
            None => Ok(()),
        }
    }

    async fn check(&self, req: &Request) -> DResult<()> {
        let key = request_key(req);
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

    /// GC of one network: releases that network's attachments the runtime
    /// no longer lists. Other networks' attachments, and format-1 ones
    /// whose network is unknown, are never touched (recovery releases those
    /// once their netns is gone). Without the list, nothing is released.
    async fn gc(self: &Arc<Self>, req: &Request) -> DResult<()> {
        let network = req.conf.name.as_str();
        let Some(list) = &req.conf.valid_attachments else {
            return Err(DaemonError::Config(format!(
                "GC of network {network:?} needs cni.dev/valid-attachments; nothing was released"
            )));
        };
        let valid: BTreeSet<AttachmentKey> = list
            .iter()
            .map(|v| AttachmentKey::new(network, &v.container_id, &v.ifname))
            .collect();
        let stale: Vec<AttachmentKey> = self
            .lock()
            .attachments()
            .filter(|a| a.key.network == network && !valid.contains(&a.key))
            .map(|a| a.key.clone())
            .collect();
        let mut errors = Vec::new();
        for k in &stale {
            if let Err(e) = self.release(k, true).await {
                errors.push(format!("{k}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::Internal(format!(
                "GC released {} of {} stale attachment(s); failed: {}",
                stale.len() - errors.len(),
                stale.len(),
                errors.join("; ")
            )))
        }
    }

    /// Ready when a leased block has room, or the store is reachable to
    /// lease one.
    async fn status(&self) -> DResult<()> {
        if let Some(why) = self.fatal_reason() {
            return Err(DaemonError::Busy(why));
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

/// Applies address index updates in the background. While the store does
/// not answer they queue (bounded) and are retried in order, so the index
/// catches up when the store is back.
async fn mirror_task<B: Backend, K: KernelOps>(
    d: Arc<Daemon<B, K>>,
    mut rx: mpsc::Receiver<Mirror>,
) {
    const MAX_PENDING: usize = 100_000;
    let mut pending: std::collections::VecDeque<Mirror> = std::collections::VecDeque::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    if pending.len() >= MAX_PENDING {
                        pending.pop_front();
                        tracing::warn!("address index backlog full; dropping the oldest update");
                    }
                    pending.push_back(m);
                }
                None => return,
            },
            _ = tick.tick() => {}
        }
        while let Some(m) = pending.front() {
            let r = match m {
                Mirror::Put(rec) => d.store.put_address(rec).await.map(|_| ()),
                Mirror::Delete(rec) => d.store.delete_address(rec).await.map(|_| ()),
            };
            match r {
                Ok(()) => {
                    pending.pop_front();
                }
                Err(e) if e.is_retryable() => break,
                Err(e) => {
                    tracing::warn!("address index: {e}");
                    pending.pop_front();
                }
            }
        }
    }
}

/// Watches the journal's health once a second (a failed sync in any
/// writer poisons it; then coild stops, see [`serve_until`]).
async fn journal_watch<B: Backend, K: KernelOps>(d: Arc<Daemon<B, K>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        d.check_journal();
        if d.fatal_reason().is_some() {
            return;
        }
    }
}

/// Re-runs recovery every `resync_interval`: table 119, host routes and
/// aliases, lease losses, pending releases, idle blocks.
async fn resync_task<B: Backend, K: KernelOps>(d: Arc<Daemon<B, K>>) {
    let mut tick = tokio::time::interval(d.cfg.resync_interval);
    tick.tick().await;
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        // A full link scan (orphans) on the first resync and every tenth:
        // it costs the kernel ~50 µs per veth.
        let full = n % 10 == 0;
        n += 1;
        // The store is asked only about this node's own blocks: a resync
        // costs etcd the same at 5 nodes as at 5,000.
        match d.recover(false, full, false).await {
            Ok(out) => {
                for o in out.iter().filter(|o| !o.ok) {
                    tracing::warn!(action = %o.action, "resync: {}", o.error.as_deref().unwrap_or(""));
                }
                d.release_idle_blocks_gated().await;
                if full {
                    d.reconcile_index().await;
                }
            }
            Err(e) => tracing::warn!("resync: {e}"),
        }
    }
}

/// Keeps the node's liveness key alive; re-registers after expiry or an
/// outage.
async fn liveness_task<B: Backend, K: KernelOps>(d: Arc<Daemon<B, K>>) {
    let ttl = d.cfg.liveness_ttl.as_secs().max(2) as i64;
    let period = Duration::from_secs((ttl as u64 / 3).max(1));
    let rec = NodeRecord {
        node: d.cfg.node_name.clone(),
        boot_id: d.boot_id.clone(),
        started_unix: coil::journal::now_unix(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let mut lease: Option<i64> = None;
    loop {
        let ok = match lease {
            Some(id) => d.store.keep_alive(id).await.unwrap_or(false),
            None => false,
        };
        if !ok {
            lease = d.store.register_node(&rec, ttl).await.ok();
        }
        d.store_ok.store(lease.is_some(), Ordering::Relaxed);
        tokio::time::sleep(period).await;
    }
}
