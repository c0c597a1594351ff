//! The seam to the Kubernetes API, on kube-rs: the controller's watched
//! set of Node names, the installer's removal of its boot taint, and
//! coild's Events on its Node.
//!
//! Configuration is the usual one: a kubeconfig named by `--kubeconfig`
//! (or `KUBECONFIG`, `~/.kube/config`), else the in-cluster service account
//! (its token, refreshed as kubelet rotates it, and its CA). The client
//! refuses any single answer larger than [`MAX_ANSWER`], so an API server
//! (or something posing as one) that streams without end costs an error,
//! not the controller's memory.
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

/// The largest answer read from the API in one response (a list page, a
/// Node, or the whole of one watch stream): 64 MiB. Node watches carry
/// metadata only, so a 5,000-node cluster stays far below it; a watch
/// stream that reaches it ends with an error and is started afresh.
pub const MAX_ANSWER: usize = 64 << 20;
/// How many Nodes one page of the initial list asks for.
pub const NODE_PAGE: u32 = 500;
/// How long one plain request (not a watch) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait between two attempts to list and watch Nodes again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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

/// A client for `config` whose answers are capped at `max_answer` bytes.
pub fn client_from(config: kube::Config, max_answer: usize) -> Result<kube::Client, String> {
    let url = config.cluster_url.to_string();
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| format!("Kubernetes client for {url}: {e}"))?;
    let capped = builder.with_layer(&tower::util::MapResponseLayer::new(
        move |r: http::Response<Box<kube::client::DynBody>>| {
            r.map(move |b| http_body_util::Limited::new(b, max_answer))
        },
    ));
    Ok(capped.build())
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
        while let Some(ev) = stream.next().await {
            let mut st = lock(&state);
            match ev {
                Ok(watcher::Event::Init) => st.building = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    if let (Some(b), Some(n)) = (st.building.as_mut(), o.metadata.name) {
                        b.insert(n);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(b) = st.building.take() {
                        tracing::info!(nodes = b.len(), "Kubernetes Node list complete");
                        st.names = b;
                        st.trusted = true;
                        st.lists += 1;
                        st.why.clear();
                        backoff = Duration::from_millis(500);
                    }
                }
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
                    st.trusted = false;
                    st.building = None;
                    st.why = format!("watching Nodes: {e}");
                    tracing::warn!(
                        "Kubernetes Node watch failed, listing again in {backoff:?}: {e}"
                    );
                    break;
                }
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
