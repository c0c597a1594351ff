//! The seam to the Kubernetes API, on kube-rs: the controller's watched
//! set of Node names, the installer's removal of its boot taint, and
//! coild's Events on its Node.
//!
//! Configuration is the usual one: a kubeconfig named by `--kubeconfig`
//! (or `KUBECONFIG`, `~/.kube/config`), else the in-cluster service account
//! (its token, refreshed as kubelet rotates it, and its CA). The client
//! refuses any line of an answer longer than [`MAX_ANSWER`] (a whole
//! document, or one watch event), so an API server (or something posing
//! as one) that streams without end costs an error, not the controller's
//! memory.
//!
//! There is no kube-apiserver where coil is developed or tested: the tests
//! run these paths against an HTTPS fake (cli/tests/fakekube) that checks
//! the bearer token, lists and watches Nodes, drops watches, and answers
//! with errors and oversized bodies.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;

/// The largest line read from the API: a whole answer (a list page, a
/// Node) or one event of a watch: 64 MiB. A larger one is an error, never
/// a truncated document.
pub const MAX_ANSWER: usize = 64 << 20;
/// How many Nodes one page of the initial list asks for.
pub const NODE_PAGE: u32 = 500;
/// How long one plain request (not a watch) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait between two attempts to list and watch Nodes again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest a Node watch may go without yielding anything before it is
/// taken as stalled (a reconnect hanging on a dead connection, say): then
/// the set is no longer trusted and a fresh list is taken. The server
/// ends each watch after 290 s; on a quiet cluster this costs a relist
/// every few minutes.
const WATCH_STALL: Duration = Duration::from_secs(330);

/// A client for the cluster named by `kubeconfig`, or found as kubectl
/// and in-cluster pods find theirs (`KUBECONFIG`, `~/.kube/config`, the
/// service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    client_from(config(kubeconfig).await?, MAX_ANSWER)
}

/// The configuration [`client`] uses.
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config, String> {
    Ok(match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| format!("reading kubeconfig {}: {e}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", p.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or the in-cluster service account): {e}")
        })?,
    })
}

/// A client for `config` whose answers are capped at `max_answer` bytes
/// a line: a whole document for a plain request (the API sends one JSON
/// line), one event for a watch (one JSON line each), which may then run
/// for as long as the server keeps it open.
pub fn client_from(config: kube::Config, max_answer: usize) -> Result<kube::Client, String> {
    let url = config.cluster_url.to_string();
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| format!("Kubernetes client for {url}: {e}"))?;
    let capped = builder.with_layer(&tower::util::MapResponseLayer::new(
        move |r: http::Response<Box<kube::client::DynBody>>| {
            r.map(move |inner| LineCapped {
                inner,
                since_newline: 0,
                cap: max_answer,
            })
        },
    ));
    Ok(capped.build())
}

/// An answer body that fails once a line (the bytes between two
/// newlines) passes `cap`. Nothing is buffered here; the cap bounds what
/// the client's decoder would have to hold.
struct LineCapped {
    inner: Box<kube::client::DynBody>,
    since_newline: usize,
    cap: usize,
}

impl http_body::Body for LineCapped {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let mut run = self.since_newline;
                let mut longest = 0;
                for &b in data.iter() {
                    if b == b'\n' {
                        longest = longest.max(run);
                        run = 0;
                    } else {
                        run += 1;
                    }
                }
                self.since_newline = run;
                if longest.max(run) > self.cap {
                    let cap = self.cap;
                    return std::task::Poll::Ready(Some(Err(format!(
                        "the Kubernetes API sent a line of more than {cap} bytes; refusing to read it"
                    )
                    .into())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What the controller knows of the cluster's Nodes.
#[derive(Debug, Default)]
struct NodeSetState {
    /// The Node names as of the last event.
    names: BTreeSet<String>,
    /// The names of a list under way (between Init and InitDone).
    building: Option<BTreeSet<String>>,
    /// Whether `names` is whole: true from an InitDone to the next error.
    trusted: bool,
    /// Why it is not, for the log and the error.
    why: String,
    /// Complete lists taken so far (the first one and every one after an
    /// error).
    lists: u64,
}

/// The set of Node names, kept current by a watch: one list (paged), then
/// a watch from its resourceVersion; a watch the server ends is resumed
/// from the last version seen, so no deletion is missed in between.
///
/// The set is trusted only from a complete list (InitDone) until the next
/// error. After an error (the API unreachable, an answer refused, a
/// resourceVersion too old) nothing is trusted until a fresh list is
/// whole again: a Node created while the watch was broken would otherwise
/// be missing from the set and look deleted.
#[derive(Debug, Clone)]
pub struct NodeWatch {
    inner: Arc<WatchInner>,
}

#[derive(Debug)]
struct WatchInner {
    state: Arc<Mutex<NodeSetState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchInner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NodeWatch {
    /// Starts listing and watching Nodes in the background (on the current
    /// tokio runtime). The watch stops when the last clone is dropped.
    pub fn start(client: kube::Client) -> NodeWatch {
        let state = Arc::new(Mutex::new(NodeSetState {
            why: "the first Node list is not complete yet".into(),
            ..NodeSetState::default()
        }));
        let s2 = state.clone();
        let task = tokio::spawn(async move { watch_nodes(client, s2).await });
        NodeWatch {
            inner: Arc::new(WatchInner { state, task }),
        }
    }

    /// The Node names, or why they are not known to be whole.
    pub fn snapshot(&self) -> Result<BTreeSet<String>, String> {
        let st = lock(&self.inner.state);
        if st.trusted {
            Ok(st.names.clone())
        } else {
            Err(st.why.clone())
        }
    }

    /// Complete lists taken so far.
    pub fn lists(&self) -> u64 {
        lock(&self.inner.state).lists
    }
}

fn lock(m: &Mutex<NodeSetState>) -> std::sync::MutexGuard<'_, NodeSetState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn watch_nodes(client: kube::Client, state: Arc<Mutex<NodeSetState>>) {
    // Metadata only: the controller needs names, not status.
    let api: Api<kube::core::PartialObjectMeta<Node>> = Api::all(client);
    let cfg = watcher::Config::default().page_size(NODE_PAGE);
    let mut backoff = Duration::from_millis(500);
    loop {
        // A fresh watcher starts with a fresh list.
        let stream = watcher::watcher(api.clone(), cfg.clone());
        futures::pin_mut!(stream);
        loop {
            let ev = match tokio::time::timeout(WATCH_STALL, stream.next()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => {
                    lock(&state).why = format!("the Node watch gave nothing for {WATCH_STALL:?}");
                    tracing::warn!("the Kubernetes Node watch gave nothing for {WATCH_STALL:?}");
                    break;
                }
            };
            let mut st = lock(&state);
            match ev {
                Ok(watcher::Event::Init) => st.building = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    if let (Some(b), Some(n)) = (st.building.as_mut(), o.metadata.name) {
                        b.insert(n);
                    }
                }
                Ok(watcher::Event::InitDone) => match st.building.take() {
                    Some(b) => {
                        tracing::info!(nodes = b.len(), "Kubernetes Node list complete");
                        st.names = b;
                        st.trusted = true;
                        st.lists += 1;
                        st.why.clear();
                        backoff = Duration::from_millis(500);
                    }
                    None => {
                        st.why = "the Node list ended without having started".into();
                        break;
                    }
                },
                Ok(watcher::Event::Apply(o)) => {
                    if let Some(n) = o.metadata.name {
                        st.names.insert(n);
                    }
                }
                Ok(watcher::Event::Delete(o)) => {
                    if let Some(n) = o.metadata.name {
                        tracing::info!(node = %n, "Kubernetes Node deleted");
                        st.names.remove(&n);
                    }
                }
                Err(e) => {
                    st.why = format!("watching Nodes: {e}");
                    tracing::warn!(
                        "Kubernetes Node watch failed, listing again in {backoff:?}: {e}"
                    );
                    break;
                }
            }
        }
        // However the watch ended, nothing is trusted until a fresh list
        // is whole.
        {
            let mut st = lock(&state);
            st.trusted = false;
            st.building = None;
            if st.why.is_empty() {
                st.why = format!("the Node watch stopped; listing again in {backoff:?}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Removes the taints whose key is in `keys` from `node`; returns whether
/// it changed anything. The merge patch carries the Node's
/// resourceVersion, so a taint added meanwhile is never dropped: the API
/// answers 409 Conflict and the removal is tried again on the new Node.
pub async fn remove_taints(
    client: &kube::Client,
    node: &str,
    keys: &[String],
) -> Result<bool, String> {
    coil::store::model::validate_node_name(node).map_err(|e| e.to_string())?;
    let api: Api<Node> = Api::all(client.clone());
    let mut last = String::new();
    for _ in 0..5 {
        let n = timed(format!("getting Node {node}"), api.get(node)).await?;
        let rv = n
            .metadata
            .resource_version
            .ok_or_else(|| format!("Node {node} has no resourceVersion"))?;
        let taints: Vec<Taint> = n.spec.and_then(|s| s.taints).unwrap_or_default();
        let kept: Vec<&Taint> = taints.iter().filter(|t| !keys.contains(&t.key)).collect();
        if kept.len() == taints.len() {
            return Ok(false);
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": rv},
            "spec": {"taints": kept},
        });
        let sent = tokio::time::timeout(
            REQUEST_TIMEOUT,
            api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await;
        match sent {
            Ok(Ok(_)) => return Ok(true),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                last = s.message.clone();
                tracing::info!(node, "the Node changed meanwhile; removing the taint again");
            }
            Ok(Err(e)) => return Err(format!("patching Node {node}: {e}")),
            Err(_) => {
                return Err(format!(
                    "patching Node {node}: no answer within {REQUEST_TIMEOUT:?}"
                ))
            }
        }
    }
    Err(format!(
        "patching Node {node}: still conflicting after 5 tries: {last}"
    ))
}

async fn timed<T>(
    what: String,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// Something an operator should see on `kubectl describe node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Another node holds the lease of one of this node's blocks; no new
    /// address is taken from it (`pods`: pods of this node still in it).
    LeaseLost {
        block: String,
        owner: String,
        pods: usize,
    },
    /// This node carries a removal fence: its old blocks are quarantined
    /// and no ADD is served until `coilctl node readmit`.
    Quarantined,
    /// The fence was lifted (`coilctl node readmit`).
    Readmitted,
    /// An ADD failed because a pool's family has no free block.
    PoolExhausted { pool: String, family: String },
}

impl NodeEvent {
    /// The Event's reason (PascalCase, as `kubectl` shows it).
    pub fn reason(&self) -> &'static str {
        match self {
            NodeEvent::LeaseLost { .. } => "CoilLeaseLost",
            NodeEvent::Quarantined => "CoilNodeQuarantined",
            NodeEvent::Readmitted => "CoilNodeReadmitted",
            NodeEvent::PoolExhausted { .. } => "CoilPoolExhausted",
        }
    }

    fn warning(&self) -> bool {
        !matches!(self, NodeEvent::Readmitted)
    }

    fn action(&self) -> &'static str {
        match self {
            NodeEvent::LeaseLost { .. } => "QuarantineBlock",
            NodeEvent::Quarantined => "RefuseAdd",
            NodeEvent::Readmitted => "ServeAdd",
            NodeEvent::PoolExhausted { .. } => "AcquireBlock",
        }
    }

    /// The human text; each names the runbook's next step.
    pub fn note(&self, node: &str) -> String {
        match self {
            NodeEvent::LeaseLost { block, owner, pods } => format!(
                "block {block} is leased to {owner}: no new address is taken from it; \
                 {pods} pod(s) of this node still use it (see `coilctl node blocks {node}`)"
            ),
            NodeEvent::Quarantined => format!(
                "node {node} was removed from coil (coilctl node remove, or its Node deleted): \
                 its old blocks are quarantined and no pod is given an address until \
                 `coilctl node readmit {node}`"
            ),
            NodeEvent::Readmitted => format!("node {node} was re-admitted; ADD is served again"),
            NodeEvent::PoolExhausted { pool, family } => format!(
                "pool {pool} has no free {family} block: pods on this node get no address \
                 (grow it with `coilctl pool add-subnet {pool} SUBNET`)"
            ),
        }
    }

    /// Events with the same key are sent at most once per
    /// [`EVENT_REPEAT`]; the edges (quarantined, readmitted) always are.
    fn key(&self) -> Option<String> {
        match self {
            NodeEvent::LeaseLost { block, owner, .. } => Some(format!("lease/{block}/{owner}")),
            NodeEvent::PoolExhausted { pool, family } => Some(format!("pool/{pool}/{family}")),
            NodeEvent::Quarantined | NodeEvent::Readmitted => None,
        }
    }
}

/// Shortest time between two Events of the same key.
pub const EVENT_REPEAT: Duration = Duration::from_secs(300);
/// Events waiting to be sent; more are dropped (and counted).
const EVENT_QUEUE: usize = 64;

/// What happened to the Events handed to an [`EventSink`].
#[derive(Debug, Default)]
pub struct EventStats {
    pub sent: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Not sent because the same one was sent less than
    /// [`EVENT_REPEAT`] ago.
    pub suppressed: std::sync::atomic::AtomicU64,
}

/// Kubernetes Events on this node's Node object, best effort: `emit`
/// never blocks, never fails and never waits for the API. A task sends
/// them (events.k8s.io/v1, namespace `default`, as kubelet's Node events),
/// each as an Event of its own; a repeat of the same key within
/// [`EVENT_REPEAT`] of a sent one is not sent (a failed send does not
/// hold the next one back).
#[derive(Debug, Clone, Default)]
pub struct EventSink {
    tx: Option<tokio::sync::mpsc::Sender<NodeEvent>>,
    pub stats: Arc<EventStats>,
}

impl EventSink {
    /// A sink that sends nothing (no Kubernetes API configured).
    pub fn disabled() -> EventSink {
        EventSink::default()
    }

    /// Starts the sending task on the current tokio runtime.
    pub fn start(client: kube::Client, node: &str) -> EventSink {
        use k8s_openapi::api::events::v1::Event;
        use std::sync::atomic::Ordering::Relaxed;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<NodeEvent>(EVENT_QUEUE);
        let stats = Arc::new(EventStats::default());
        let s2 = stats.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            // Node Events live in `default`, as kubelet's do.
            let api: Api<Event> = Api::namespaced(client, "default");
            // As kubelet does, the Node's UID is its name, which is what
            // `kubectl describe node` looks up.
            let regarding = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.clone()),
                uid: Some(node.clone()),
                ..Default::default()
            };
            // When each key was last sent (pruned as keys age out).
            let mut last: std::collections::HashMap<String, std::time::Instant> =
                Default::default();
            let mut n: u64 = 0;
            while let Some(ev) = rx.recv().await {
                let key = ev.key();
                if let Some(k) = &key {
                    if last.get(k).is_some_and(|t| t.elapsed() < EVENT_REPEAT) {
                        s2.suppressed.fetch_add(1, Relaxed);
                        continue;
                    }
                }
                // Each Event is its own object (its note names the block
                // or pool); repeats are held back above, not merged.
                n += 1;
                let now = k8s_openapi::jiff::Timestamp::now();
                let e = Event {
                    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        name: Some(format!("{node}.coil.{}.{n}", now.as_nanosecond())),
                        namespace: Some("default".into()),
                        ..Default::default()
                    },
                    event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                        now,
                    )),
                    type_: Some(if ev.warning() { "Warning" } else { "Normal" }.into()),
                    reason: Some(ev.reason().into()),
                    action: Some(ev.action().into()),
                    note: Some(ev.note(&node)),
                    regarding: Some(regarding.clone()),
                    reporting_controller: Some("coil.cybozu.com/coild".into()),
                    reporting_instance: Some(node.clone()),
                    ..Default::default()
                };
                let sent = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    api.create(&kube::api::PostParams::default(), &e),
                )
                .await;
                match sent {
                    Ok(Ok(_)) => {
                        s2.sent.fetch_add(1, Relaxed);
                        if let Some(k) = key {
                            last.retain(|_, t| t.elapsed() < EVENT_REPEAT);
                            last.insert(k, std::time::Instant::now());
                        }
                    }
                    Ok(Err(err)) => {
                        s2.failed.fetch_add(1, Relaxed);
                        tracing::warn!(reason = ev.reason(), "sending a Kubernetes Event: {err}");
                    }
                    Err(_) => {
                        s2.failed.fetch_add(1, Relaxed);
                        tracing::warn!(
                            reason = ev.reason(),
                            "sending a Kubernetes Event: no answer within {REQUEST_TIMEOUT:?}"
                        );
                    }
                }
            }
        });
        EventSink {
            tx: Some(tx),
            stats,
        }
    }

    /// Queues `ev`; drops it (counted) if the queue is full.
    pub fn emit(&self, ev: NodeEvent) {
        if let Some(tx) = &self.tx {
            if tx.try_send(ev).is_err() {
                self.stats
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }
}
