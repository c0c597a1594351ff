//! The etcd adapter: the only module that knows etcd-client.
//!
//! # Several endpoints, and a member that dies or is cut off
//!
//! etcd-client balances one channel over all endpoints, and a request the
//! balancer sends to a partitioned member (its link down, so packets are
//! silently dropped) hangs until the deadline while the healthy members sit
//! idle. So this adapter keeps **one client per endpoint** (each a lazy
//! tonic channel that reconnects by itself) and sends every request to one
//! member at a time:
//!
//! * Requests go to the *preferred* member, the last one that answered.
//!   A member that fails with a transport error or times out is marked
//!   suspect for [`SUSPECT_FOR`]: the preference moves on, and suspect
//!   members are tried only after every healthy one.
//! * Whether a failed request is tried again on the next member (at most
//!   [`MAX_ATTEMPTS`] members per request) depends on whether a repeat is
//!   safe:
//!   - reads (transactions made only of range ops), lease keep-alives and
//!     revocations are idempotent: retried after any `Unavailable` failure
//!     or timeout;
//!   - writes (transactions with a put or delete, lease grants) are retried
//!     only when the failure proves the request never left this process:
//!     the connection to the member could not be made (tonic's
//!     `ConnectError`: refused, connect timeout, TLS handshake). After a
//!     timeout or a reset on an established connection the write may have
//!     been applied, so the adapter returns `Unavailable` and lets the store
//!     layer (which re-reads before every compare-and-swap) decide; the
//!     next request already goes to another member.
//! * Before a write to a member that has not answered for [`PROBE_AFTER`],
//!   a serializable read (answered locally, cheap) checks it is still
//!   there: a member cut off since it last answered then fails the probe,
//!   and the write, never sent, goes to the next member instead of
//!   timing out where it may or may not have been applied.
//! * An answer that refuses the request (`Rejected`: permission denied, a
//!   bad certificate...) is returned at once: another member would say
//!   the same.
//! * Every client sets etcd's `require_leader`, so a member that lost
//!   quorum answers "no leader" at once instead of holding the request
//!   until the deadline.
//!
//! Every error names the operation, the first key, and each endpoint tried
//! with what it answered, so "store unavailable" says which members were
//! down and how.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    PutOptions, TlsOptions, TxnOp, TxnOpResponse,
};

use coil::store::backend::{
    Backend, BackendError, BackendErrorKind, Cmp, CmpOp, KeyValue, Op, OpResult, Txn, TxnResult,
};

/// The largest answer read from etcd. gRPC's default of 4 MiB is reached
/// by a listing of every block near 15,000 nodes, which a coild start, a
/// `node repair` and the controller's pass read: past it they failed with
/// "decoded message length too large". The address index, the one prefix
/// that grows with pods, is read in pages instead.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Members one request is sent to at most before it fails.
pub const MAX_ATTEMPTS: usize = 3;
/// How long a member that failed is tried only after the others.
pub const SUSPECT_FOR: Duration = Duration::from_secs(5);
/// A write to a member quiet for longer is preceded by a probe.
pub const PROBE_AFTER: Duration = Duration::from_secs(1);

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Deadline of every request (and of connecting), per member tried.
    pub timeout: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<TlsPem>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            timeout: Duration::from_secs(2),
            username: None,
            password: None,
            tls: None,
        }
    }
}

/// PEM material for TLS: a CA to verify etcd, and optionally a client
/// certificate and key (read from files or given inline by the caller).
#[derive(Clone, Default)]
pub struct TlsPem {
    pub ca: Option<Vec<u8>>,
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("ca", &self.ca.is_some())
            .field("cert", &self.cert.is_some())
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Is a request safe to send to another member after this failure?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Idempotent: after any unavailability.
    Always,
    /// Not idempotent: only if it was provably never sent.
    NotSent,
}

/// One etcd member: its endpoint, its client (made on first use) and
/// until when it is suspect.
struct Member {
    endpoint: String,
    client: tokio::sync::Mutex<Option<Client>>,
    suspect_until: Mutex<Option<Instant>>,
    /// When it last answered.
    last_ok: Mutex<Option<Instant>>,
}

impl Member {
    fn is_suspect(&self, now: Instant) -> bool {
        let g = self.suspect_until.lock().unwrap_or_else(|e| e.into_inner());
        g.is_some_and(|t| t > now)
    }

    fn set_suspect(&self, suspect: bool) {
        let mut g = self.suspect_until.lock().unwrap_or_else(|e| e.into_inner());
        *g = suspect.then(|| Instant::now() + SUSPECT_FOR);
    }

    fn answered(&self) {
        let mut g = self.last_ok.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(Instant::now());
    }

    /// Has it answered within `d`?
    fn answered_within(&self, d: Duration) -> bool {
        let g = self.last_ok.lock().unwrap_or_else(|e| e.into_inner());
        g.is_some_and(|t| t.elapsed() < d)
    }
}

/// How one attempt on one member failed.
struct Failure {
    kind: BackendErrorKind,
    /// The request provably never reached the member.
    not_sent: bool,
    message: String,
}

/// A store backend on a real etcd cluster. Cheap to clone; clones share
/// the connections, the member preference and the request counter.
#[derive(Clone)]
pub struct EtcdBackend {
    members: Arc<Vec<Member>>,
    preferred: Arc<AtomicUsize>,
    options: ConnectOptions,
    /// TLS is configured (for the hint on closed connections).
    tls: bool,
    endpoints: String,
    timeout: Duration,
    requests: Arc<AtomicU64>,
    /// Open keep-alive streams, one per lease kept alive (a node keeps one):
    /// each keep-alive is one message on it, not a new gRPC stream (a new
    /// stream per keep-alive was half of an idle node's load on etcd, and
    /// ended each one with code Unavailable in etcd's metrics).
    keepalives: Arc<tokio::sync::Mutex<HashMap<i64, KeepAlive>>>,
}

/// A lease's open keep-alive stream.
struct KeepAlive {
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

/// More open keep-alive streams than this are dropped (leases abandoned by
/// their holder without expiring here).
const MAX_KEEPALIVE_STREAMS: usize = 256;

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl EtcdBackend {
    /// Connects to etcd: one client per endpoint. Fails, naming the
    /// endpoints, on a bad configuration or if no member answers within
    /// the timeout (with credentials, connecting authenticates; without,
    /// clients connect on first use).
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdBackend, BackendError> {
        let endpoints = opts.endpoints.join(",");
        let fail = |kind, message: String| BackendError {
            kind,
            op: "connect".into(),
            key: "-".into(),
            endpoint: endpoints.clone(),
            message,
        };
        if opts.endpoints.is_empty() {
            return Err(fail(
                BackendErrorKind::Rejected,
                "no etcd endpoints configured".into(),
            ));
        }
        let mut co = ConnectOptions::new()
            .with_timeout(opts.timeout)
            .with_connect_timeout(opts.timeout)
            .with_keep_alive(Duration::from_secs(10), opts.timeout)
            .with_require_leader(true);
        if let (Some(u), Some(p)) = (&opts.username, &opts.password) {
            co = co.with_user(u.clone(), p.clone());
        }
        if let Some(t) = &opts.tls {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &t.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca.clone()));
            }
            match (&t.cert, &t.key) {
                (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(c.clone(), k.clone())),
                (None, None) => {}
                _ => {
                    return Err(fail(
                        BackendErrorKind::Rejected,
                        "a TLS client certificate needs both a certificate and a key".into(),
                    ))
                }
            }
            co = co.with_tls(tls);
        }
        let members: Vec<Member> = opts
            .endpoints
            .iter()
            .map(|e| Member {
                endpoint: e.clone(),
                client: tokio::sync::Mutex::new(None),
                suspect_until: Mutex::new(None),
                last_ok: Mutex::new(None),
            })
            .collect();
        let backend = EtcdBackend {
            members: Arc::new(members),
            preferred: Arc::new(AtomicUsize::new(0)),
            options: co,
            tls: opts.tls.is_some(),
            endpoints: endpoints.clone(),
            timeout: opts.timeout,
            requests: Arc::new(AtomicU64::new(0)),
            keepalives: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
        };
        // Connect to every member at once; one success is enough (the
        // others are connected again on first use).
        let tries = (0..backend.members.len()).map(|i| backend.client(i));
        let results = futures::future::join_all(tries).await;
        let mut errors = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(_) => {
                    backend.preferred.store(i, Ordering::Relaxed);
                    return Ok(backend);
                }
                Err(f) => errors.push((i, f)),
            }
        }
        let kind = if errors
            .iter()
            .all(|(_, f)| f.kind == BackendErrorKind::Rejected)
        {
            BackendErrorKind::Rejected
        } else {
            BackendErrorKind::Unavailable
        };
        let message = errors
            .iter()
            .map(|(i, f)| format!("{}: {}", backend.members[*i].endpoint, f.message))
            .collect::<Vec<_>>()
            .join("; ");
        Err(fail(kind, message))
    }

    /// Member `i`'s client, connecting it if needed (bounded by the
    /// timeout). A failure here means nothing was sent.
    async fn client(&self, i: usize) -> Result<Client, Failure> {
        let m = &self.members[i];
        let mut g = m.client.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let connect = Client::connect([m.endpoint.as_str()], Some(self.options.clone()));
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(c)) => {
                *g = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => Err(Failure {
                kind: classify(&e),
                not_sent: true,
                message: format!("connecting: {}", describe(&e)),
            }),
            Err(_) => Err(Failure {
                kind: BackendErrorKind::Unavailable,
                not_sent: true,
                message: format!("connecting: no answer within {:?}", self.timeout),
            }),
        }
    }

    /// The members to try, in order: healthy ones from the preferred one
    /// on, then suspect ones; at most [`MAX_ATTEMPTS`].
    fn order(&self) -> Vec<usize> {
        let n = self.members.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let now = Instant::now();
        let (mut healthy, suspect): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|k| (start + k) % n)
            .partition(|&i| !self.members[i].is_suspect(now));
        healthy.extend(suspect);
        healthy.truncate(MAX_ATTEMPTS);
        healthy
    }

    /// Sends a request (`f`, given a member's client) to one member after
    /// another until one answers, as the module documentation describes.
    async fn call<T, F, Fut>(
        &self,
        op: &str,
        key: &str,
        retry: Retry,
        mut f: F,
    ) -> Result<T, BackendError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let order = self.order();
        let mut tried: Vec<(usize, Failure)> = Vec::new();
        for &i in &order {
            let attempt = async {
                let c = self.client(i).await?;
                if retry == Retry::NotSent && !self.members[i].answered_within(PROBE_AFTER) {
                    self.probe(i, key, &c).await?;
                }
                match tokio::time::timeout(self.timeout, f(c)).await {
                    Ok(Ok(v)) => Ok(v),
                    // tonic's own deadline (the same as ours) may fire
                    // first: say it the same way.
                    Ok(Err(e)) if timed_out(&e) => Err(Failure {
                        kind: BackendErrorKind::Unavailable,
                        not_sent: false,
                        message: format!("no answer within {:?}", self.timeout),
                    }),
                    Ok(Err(e)) => Err(Failure {
                        kind: classify(&e),
                        not_sent: never_sent(&e),
                        message: describe(&e),
                    }),
                    Err(_) => Err(Failure {
                        kind: BackendErrorKind::Unavailable,
                        not_sent: false,
                        message: format!("no answer within {:?}", self.timeout),
                    }),
                }
            };
            match attempt.await {
                Ok(v) => {
                    self.members[i].answered();
                    self.members[i].set_suspect(false);
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(fail) => {
                    let stop = match fail.kind {
                        BackendErrorKind::Unavailable => {
                            self.members[i].set_suspect(true);
                            // A failed channel can stay failed (tower's
                            // buffer keeps a poll_ready error), and one to a
                            // cut-off member keeps its dead connection until
                            // keep-alive notices: start afresh next time.
                            *self.members[i].client.lock().await = None;
                            let next = order.iter().copied().find(|&j| j != i).unwrap_or(i);
                            // Only move the preference off this member
                            // (a concurrent success elsewhere wins).
                            let _ = self.preferred.compare_exchange(
                                i,
                                next,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                            retry == Retry::NotSent && !fail.not_sent
                        }
                        _ => true,
                    };
                    tried.push((i, fail));
                    if stop {
                        break;
                    }
                }
            }
        }
        Err(self.failed(op, key, tried))
    }

    /// Before a write to a member that has been quiet for a while: a
    /// serializable read (answered locally, no quorum round) to check it is
    /// still there, so a write is not lost to a member cut off since. A
    /// probe that fails for unavailability fails the attempt as "not
    /// sent"; one the member refuses (say, no permission on `key`) is
    /// ignored.
    async fn probe(&self, i: usize, key: &str, c: &Client) -> Result<(), Failure> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut kv = c.kv_client();
        let opts = GetOptions::new().with_serializable().with_count_only();
        let unavailable = |message: String| Failure {
            kind: BackendErrorKind::Unavailable,
            not_sent: true,
            message: format!("probe before writing: {message}"),
        };
        match tokio::time::timeout(self.timeout, kv.get(key, Some(opts))).await {
            Ok(Ok(_)) => {
                self.members[i].answered();
                Ok(())
            }
            Ok(Err(e)) if timed_out(&e) => {
                Err(unavailable(format!("no answer within {:?}", self.timeout)))
            }
            Ok(Err(e)) if classify(&e) == BackendErrorKind::Unavailable => {
                Err(unavailable(describe(&e)))
            }
            // Refused (permissions...): says nothing about reachability.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(unavailable(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// The error of a request every tried member failed.
    fn failed(&self, op: &str, key: &str, tried: Vec<(usize, Failure)>) -> BackendError {
        let kind = tried
            .last()
            .map(|(_, f)| f.kind)
            .unwrap_or(BackendErrorKind::Unavailable);
        let endpoint = tried
            .iter()
            .map(|(i, _)| self.members[*i].endpoint.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut message = match tried.as_slice() {
            [(_, f)] => f.message.clone(),
            many => many
                .iter()
                .map(|(i, f)| format!("{}: {}", self.members[*i].endpoint, f.message))
                .collect::<Vec<_>>()
                .join("; "),
        };
        // With TLS 1.3 a member that refuses the client certificate does so
        // after the client considers the handshake done: the client sees
        // only its connection closed, often without the alert.
        let closed = |m: &str| {
            ["connection closed", "broken pipe", "connection reset"]
                .iter()
                .any(|c| m.contains(c))
        };
        if self.tls
            && tried.len() == self.members.len().min(MAX_ATTEMPTS)
            && tried.iter().all(|(_, f)| closed(&f.message))
        {
            message.push_str(
                " (every member closed the connection: etcd does that when it refuses \
                 the TLS client certificate; check the client certificate, key and CA)",
            );
        }
        BackendError {
            kind,
            op: op.to_string(),
            key: key.to_string(),
            endpoint: if endpoint.is_empty() {
                self.endpoints.clone()
            } else {
                endpoint
            },
            message,
        }
    }
}

/// The causes of an error, outermost first. etcd-client's error does not
/// chain to the gRPC status's source, which holds the transport's cause.
fn causes(e: &etcd_client::Error) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
        other => std::error::Error::source(other),
    };
    while let Some(s) = src {
        out.push(s);
        src = s.source();
    }
    out
}

/// Did the request provably never reach the server? True when the
/// connection could not be made (tonic wraps every connector failure —
/// refused, connect timeout, TLS handshake — in `ConnectError`) or the
/// channel was not ready to send (tonic's generated clients report that
/// as "Service was not ready").
fn never_sent(e: &etcd_client::Error) -> bool {
    if let etcd_client::Error::GRpcStatus(s) = e {
        if s.message().starts_with("Service was not ready") {
            return true;
        }
    }
    causes(e)
        .iter()
        .any(|c| c.downcast_ref::<tonic::ConnectError>().is_some())
}

/// Did tonic's request deadline expire?
fn timed_out(e: &etcd_client::Error) -> bool {
    causes(e)
        .iter()
        .any(|c| c.downcast_ref::<tonic::TimeoutExpired>().is_some())
}

/// A TLS failure: the member refused our client certificate, or we
/// refused its certificate. Another member would say the same.
fn tls_failure(e: &etcd_client::Error) -> Option<&'static str> {
    let root = causes(e).last().map(|c| c.to_string().to_lowercase())?;
    if root.contains("received fatal alert") {
        Some("etcd refused the TLS client certificate (check the client certificate, key and CA)")
    } else if root.contains("invalid peer certificate") || root.contains("certificate") {
        Some("etcd's TLS certificate was not accepted (check the CA and the endpoint addresses)")
    } else {
        None
    }
}

/// A one-line description: the gRPC status and the innermost cause (for
/// example "connection refused"), without tonic's debug dumps.
fn describe(e: &etcd_client::Error) -> String {
    let root = causes(e).last().map(|c| c.to_string());
    let head = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            if m.is_empty() {
                format!("{:?}", s.code())
            } else {
                format!("{:?}: {m}", s.code())
            }
        }
        other => other.to_string(),
    };
    let text = match root {
        Some(r) if !head.contains(&r) => format!("{head}: {r}"),
        _ => head,
    };
    match tls_failure(e) {
        Some(hint) => format!("{text} ({hint})"),
        None => text,
    }
}

fn classify(e: &etcd_client::Error) -> BackendErrorKind {
    use etcd_client::Error as E;
    if tls_failure(e).is_some() {
        return BackendErrorKind::Rejected;
    }
    match e {
        E::GRpcStatus(s) => match s.code() {
            tonic_code::Unavailable
            | tonic_code::DeadlineExceeded
            | tonic_code::Aborted
            | tonic_code::ResourceExhausted
            | tonic_code::Unknown
            | tonic_code::Cancelled => BackendErrorKind::Unavailable,
            _ => BackendErrorKind::Rejected,
        },
        E::TransportError(_) | E::IoError(_) => BackendErrorKind::Unavailable,
        _ => BackendErrorKind::Rejected,
    }
}

/// tonic's status codes (etcd-client does not re-export them).
use tonic::Code as tonic_code;

fn cmp_op(op: CmpOp) -> CompareOp {
    match op {
        CmpOp::Equal => CompareOp::Equal,
        CmpOp::NotEqual => CompareOp::NotEqual,
        CmpOp::Less => CompareOp::Less,
        CmpOp::Greater => CompareOp::Greater,
    }
}

fn to_compare(c: Cmp) -> Compare {
    match c {
        Cmp::CreateRevision { key, op, rev } => Compare::create_revision(key, cmp_op(op), rev),
        Cmp::ModRevision { key, op, rev } => Compare::mod_revision(key, cmp_op(op), rev),
        Cmp::ValueEquals { key, value } => Compare::value(key, CompareOp::Equal, value),
        Cmp::RangeUnchangedBefore { start, end, rev } => {
            Compare::mod_revision(start, CompareOp::Less, rev).with_range(end)
        }
    }
}

fn to_op(o: Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            TxnOp::put(key, value, opts)
        }
        Op::Delete { key } => TxnOp::delete(key, None),
        Op::DeleteRange { start, end } => {
            TxnOp::delete(start, Some(DeleteOptions::new().with_range(end)))
        }
        Op::Range {
            start,
            end,
            limit,
            keys_only,
        } => {
            let mut g = GetOptions::new();
            if !end.is_empty() {
                g = g.with_range(end);
            }
            if limit > 0 {
                g = g.with_limit(limit);
            }
            if keys_only {
                g = g.with_keys_only();
            }
            TxnOp::get(start, Some(g))
        }
    }
}

fn from_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn first_key(t: &Txn) -> String {
    let k = t
        .then
        .iter()
        .chain(t.otherwise.iter())
        .map(|o| match o {
            Op::Put { key, .. } | Op::Delete { key } => key,
            Op::DeleteRange { start, .. } | Op::Range { start, .. } => start,
        })
        .next();
    k.map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_else(|| "-".into())
}

impl Backend for EtcdBackend {
    async fn txn(&self, op: &str, txn: Txn) -> Result<TxnResult, BackendError> {
        let key = first_key(&txn);
        let read_only = txn
            .then
            .iter()
            .chain(txn.otherwise.iter())
            .all(|o| !o.is_write());
        let retry = if read_only {
            Retry::Always
        } else {
            Retry::NotSent
        };
        let t = etcd_client::Txn::new()
            .when(txn.when.into_iter().map(to_compare).collect::<Vec<_>>())
            .and_then(txn.then.into_iter().map(to_op).collect::<Vec<_>>())
            .or_else(txn.otherwise.into_iter().map(to_op).collect::<Vec<_>>());
        let resp = self
            .call(op, &key, retry, |c| {
                let t = t.clone();
                async move {
                    c.kv_client()
                        .max_decoding_message_size(MAX_ANSWER_BYTES)
                        .txn(t)
                        .await
                }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let results = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Put(_) => OpResult::Put,
                TxnOpResponse::Delete(d) => OpResult::Deleted(d.deleted().max(0) as u64),
                TxnOpResponse::Get(g) => OpResult::Range(g.kvs().iter().map(from_kv).collect()),
                TxnOpResponse::Txn(_) => OpResult::Put,
            })
            .collect();
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision,
            results,
        })
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, BackendError> {
        // A repeated grant would leave an unused lease (it expires by
        // itself), but the caller could not know which one it holds.
        let r = self
            .call("grant lease", "-", Retry::NotSent, |c| async move {
                c.lease_client().grant(ttl_secs, None).await
            })
            .await?;
        Ok(r.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, BackendError> {
        let key = format!("lease {id:x}");
        let mut open = self.keepalives.lock().await;
        // The lease's open stream: one message each way. Any failure (the
        // member went away, no answer in time) drops the stream, and the
        // keep-alive is tried again on a new one below, which may be on
        // another member; an answer that comes late is never read as the
        // answer to a later keep-alive, since its stream is gone.
        if let Some(ka) = open.get_mut(&id) {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let sent = tokio::time::timeout(self.timeout, async {
                ka.keeper.keep_alive().await?;
                ka.stream.message().await
            })
            .await;
            match sent {
                Ok(Ok(Some(r))) if r.ttl() > 0 => return Ok(r.ttl()),
                Ok(Ok(Some(_))) => {
                    // Expired: etcd answers TTL 0.
                    open.remove(&id);
                    return Ok(0);
                }
                _ => {
                    open.remove(&id);
                }
            }
        }
        // Open a stream, send one keep-alive, read its answer: as a whole
        // on one member, and idempotent. The stream stays open for the next.
        let res = self
            .call("keep lease alive", &key, Retry::Always, |c| async move {
                let (mut keeper, mut stream) = c.lease_client().keep_alive(id).await?;
                keeper.keep_alive().await?;
                let ttl = stream.message().await?.map(|r| r.ttl()).unwrap_or(0);
                Ok((keeper, stream, ttl))
            })
            .await;
        match res {
            Ok((keeper, stream, ttl)) => {
                if ttl > 0 {
                    if open.len() >= MAX_KEEPALIVE_STREAMS {
                        open.clear();
                    }
                    open.insert(id, KeepAlive { keeper, stream });
                }
                Ok(ttl)
            }
            // etcd answers an expired lease with "lease not found".
            Err(e) if e.message.contains("lease not found") => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), BackendError> {
        self.keepalives.lock().await.remove(&id);
        match self
            .call(
                "revoke lease",
                &format!("lease {id:x}"),
                Retry::Always,
                |c| async move { c.lease_client().revoke(id).await },
            )
            .await
        {
            Ok(_) => Ok(()),
            // An expired or unknown lease is already gone.
            Err(e) if e.message.contains("requested lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(endpoints: &[String]) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints.to_vec(),
            timeout: Duration::from_millis(300),
            ..Default::default()
        }
    }

    /// A local port nothing listens on.
    fn closed_port() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = l.local_addr().expect("addr");
        drop(l);
        format!("http://{a}")
    }

    fn put() -> Txn {
        Txn {
            then: vec![Op::put("/k", "v")],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn healthy_members_first_from_the_preferred_one() {
        let eps: Vec<String> = (0..5)
            .map(|i| format!("http://127.0.0.1:{}", 1 + i))
            .collect();
        let b = EtcdBackend::connect(&opts(&eps))
            .await
            .expect("lazy connect");
        b.preferred.store(1, Ordering::Relaxed);
        assert_eq!(b.order(), vec![1, 2, 3]);
        b.members[2].set_suspect(true);
        b.members[3].set_suspect(true);
        assert_eq!(b.order(), vec![1, 4, 0]);
        for m in b.members.iter() {
            m.set_suspect(true);
        }
        assert_eq!(b.order(), vec![1, 2, 3], "all suspect: plain rotation");
        b.members[3].set_suspect(false);
        assert_eq!(b.order(), vec![3, 1, 2]);
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_even_for_a_write() {
        let eps = vec![closed_port(), closed_port()];
        let b = EtcdBackend::connect(&opts(&eps))
            .await
            .expect("lazy connect");
        let e = b.txn("put it", put()).await.expect_err("nothing listens");
        assert_eq!(e.kind, BackendErrorKind::Unavailable, "{e}");
        assert_eq!(e.op, "put it");
        assert_eq!(e.key, "/k");
        // Never sent: the write went on to the second member.
        assert_eq!(e.endpoint, eps.join(","), "{e}");
        for ep in &eps {
            assert!(e.message.contains(ep.as_str()), "{e}");
        }
        // The preference moved off the first member, which is suspect.
        assert!(b.members[0].is_suspect(Instant::now()));
    }

    #[tokio::test]
    async fn a_write_that_timed_out_is_not_repeated_but_a_read_is() {
        // Accepts TCP connections (the kernel's backlog) but never speaks
        // HTTP/2: requests hang until the deadline.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let eps = vec![
            format!("http://{}", silent.local_addr().expect("addr")),
            closed_port(),
        ];
        let b = EtcdBackend::connect(&opts(&eps))
            .await
            .expect("lazy connect");
        // Quiet for a while: the write is preceded by a probe, which times
        // out; the write, never sent, moves on to the next member.
        let e = b.txn("put it", put()).await.expect_err("no answer");
        assert_eq!(e.endpoint, eps.join(","), "{e}");
        assert!(e.message.contains("probe before writing"), "{e}");

        // Answered just now: no probe, the write is sent, times out, and
        // is not repeated elsewhere.
        b.members[0].set_suspect(false);
        b.members[0].answered();
        b.preferred.store(0, Ordering::Relaxed);
        let e = b.txn("put it", put()).await.expect_err("no answer");
        assert_eq!(e.kind, BackendErrorKind::Unavailable, "{e}");
        assert_eq!(e.endpoint, eps[0], "the write may have been applied: {e}");
        assert!(e.message.contains("no answer within"), "{e}");

        // A read is tried on every member.
        b.members[0].set_suspect(false);
        b.preferred.store(0, Ordering::Relaxed);
        let e = b
            .txn("read it", Txn::read(vec![Op::get("/k")]))
            .await
            .expect_err("no answer");
        assert_eq!(e.endpoint, eps.join(","), "{e}");
    }
}
